"""Decoding: greedy or sampled continuations of token ids, from a plain HF model or the TP model.

A plain Hugging Face model (tp = 1, adapters injected) decodes with its own ``generate`` and KV
cache. The tensor-parallel model (``TPCausalLM``, Hugging Face's model with its linears split)
decodes in ``tp_generate``, with HF's KV cache too, but in a loop of its own: every forward is a
collective, so the ranks must step together (``use_cache=False`` there recomputes the whole
sequence per token, the reference the cached path is tested against).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from malora_dist.runtime.groups import ParallelGroups


@dataclass(frozen=True)
class Sampling:
    """temperature 0: greedy; otherwise sampling from softmax(logits / temperature), restricted to
    the smallest set of tokens with probability ≥ top_p. ``seed`` makes sampling repeatable.
    ``use_cache``: decode against HF's KV cache (False recomputes the whole sequence per token)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be ≥ 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


class StopWhen:
    """A Hugging Face stopping criterion (``generate(stopping_criteria=[StopWhen(...)])``): stop
    once ``done(text of the new tokens)`` holds (one row: the evaluation decodes one prompt at a
    time). For answers whose end is a property of the text (a closed code block) rather than a
    token; ``transformers.StoppingCriteriaList`` accepts any such callable."""

    def __init__(self, tokenizer: Any, prompt_length: int, done: Callable[[str], bool]):
        self.tokenizer, self.prompt_length, self.done = tokenizer, prompt_length, done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length:].tolist(), skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), self.done(text), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def hf_generate(model, prompt: list[int], sampling: Sampling, eos: int, device) -> list[int]:
    """New token ids (up to and without EOS) from a plain HF causal LM, with its KV cache."""
    greedy = sampling.temperature == 0
    torch.manual_seed(sampling.seed)
    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_new_tokens,
                         do_sample=not greedy, temperature=None if greedy else sampling.temperature,
                         top_p=None if greedy else sampling.top_p, top_k=None if greedy else 0, eos_token_id=eos,
                         pad_token_id=eos, use_cache=sampling.use_cache)
    return _until_eos(out[0, len(prompt):].tolist(), eos)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: Optional[torch.Generator]) -> int:
    """The next token from one row of logits (argmax, or a top-p sample)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p  # always keeps the most likely token
    choice = torch.multinomial(sorted_probs * keep, 1, generator=generator)
    return int(order[choice])


@torch.no_grad()
def tp_generate(model, prompt: Optional[list[int]], sampling: Sampling, eos: int, groups: ParallelGroups,
                device) -> list[int]:
    """New token ids (up to and without EOS) from the tensor-parallel model; every rank calls it.

    Each forward is a collective over tp (and, with expert parallelism, over dp), so the dp ranks
    decode in lockstep: a rank with no prompt (``None``) or an answer already finished runs a
    one-token forward until all are done. tp peers pick the same tokens: their logits are the same
    gathered tensor and their generators share the seed. With ``sampling.use_cache`` the prompt runs once and
    each step feeds the new token alone against HF's KV cache (each rank's cache holds its heads);
    without it every step recomputes the whole sequence.
    """
    generator = torch.Generator().manual_seed(sampling.seed + groups.dp_rank)
    new: list[int] = []
    active = prompt is not None
    cache = None
    while _any_rank(active, groups, device):
        if not active:
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
            continue
        if sampling.use_cache:
            step_ids = prompt if cache is None else new[-1:]
            local, cache = model.forward_cached(torch.tensor([step_ids], device=device), cache)
        else:
            local = model(torch.tensor([prompt + new], device=device))
        logits = model.gather_logits(local[:, -1])[0]
        new.append(pick_token(logits.cpu(), sampling, generator))
        active = len(new) < sampling.max_new_tokens and new[-1] != eos
    return _until_eos(new, eos)


def _any_rank(flag: bool, groups: ParallelGroups, device) -> bool:
    if groups.dp_group is None:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups.dp_group)
    return bool(t.item())
