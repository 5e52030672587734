"""Prompt and target strings → token ids, with the loss only on the target and EOS.

The target is tokenised on its own and appended to the prompt's tokens, never tokenised together
with the prompt: the option scorer (evaluation) conditions each option's tokens on the prompt's
tokens the same way, so training and scoring see identical token sequences. Both must call
``encode_prompts`` and ``encode_continuations``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from malora_dist.data.prompts import Example
from malora_dist.data.records import BadRecords

IGNORE_INDEX = -100


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of prompts, with the tokenizer's own special tokens (BOS) for plain text; a chat
    template already spells its special tokens out, so ``chat`` prompts get none added."""
    return _encode(tokenizer, prompts, add_special_tokens=not chat)


def encode_continuations(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of targets/options, without special tokens (EOS is appended by the caller)."""
    return _encode(tokenizer, texts, add_special_tokens=False)


def _encode(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:  # fast tokenizers fail on an empty batch
        return []
    return tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: training targets end with EOS; set tokenizer.eos_token")
    return int(tokenizer.eos_token_id)


@dataclass
class TokenizedExample:
    """``input_ids`` = prompt tokens + target tokens + EOS; the first ``num_prompt`` carry no loss."""

    input_ids: list[int]
    num_prompt: int
    task_id: int

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.num_prompt + self.input_ids[self.num_prompt :]


@dataclass
class TokenizeCounts:
    truncated: int = 0
    dropped: int = 0


def tokenize_examples(
    tokenizer: Any,
    examples: Sequence[Example],
    seq_len: int,
    overlong: str,
    chat: bool,
    bad: BadRecords,
) -> tuple[list[TokenizedExample], TokenizeCounts]:
    """Tokenise ``examples``; an over-long one is truncated from the left of its prompt or
    dropped (``overlong``), and counted. Truncation keeps ≥ 1 prompt token, so the first token of
    every example carries no loss (a packed sequence's shifted loss never predicts one example
    from the previous one); an answer too long for that is dropped even when truncating."""
    eos = eos_id(tokenizer)
    prompts = encode_prompts(tokenizer, [e.prompt for e in examples], chat)
    targets = encode_continuations(tokenizer, [e.target for e in examples])
    out, counts = [], TokenizeCounts()
    for example, prompt, target in zip(examples, prompts, targets):
        if not target:
            bad.reject(example.where, f"the answer {example.target!r} tokenises to nothing")
            continue
        if not prompt:
            bad.reject(example.where, f"the prompt {example.prompt!r} tokenises to nothing")
            continue
        room = seq_len - len(target) - 1
        if len(prompt) > room:
            if overlong == "drop" or room < 1:
                counts.dropped += 1
                continue
            prompt = prompt[len(prompt) - room :]
            counts.truncated += 1
        out.append(TokenizedExample(list(prompt) + list(target) + [eos], len(prompt), example.task_id))
    return out, counts
