"""Score examples with a (possibly sharded) ``TPCausalLM``: option log-probabilities and greedy answers.

Multiple choice: an option's score is the summed log-probability of its continuation tokens after
the prompt (no length normalisation); the continuation is tokenised on its own and appended to
the prompt's tokens (``encode_prompts`` / ``encode_continuations``, as training does). Generation:
greedy decoding with the KV cache, the text up to EOS (or a stop string); ``metrics`` scores it by
the task's metric.

Every forward of a model with mixture-of-experts adapters is a collective over the dp group (the
routing counts' all-reduce, the all-to-all of expert parallelism), so the dp ranks, which score
different examples, run the same number of forwards: a rank that has run out of work runs a
one-token dummy forward while the others finish (``lockstep_rounds``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from malora_dist.data import build_prompt, encode_continuations, encode_prompts, option_continuations
from malora_dist.data.records import DataError
from malora_dist.data.tokenize import eos_id
from malora_dist.evaluation.answer_metrics import MAX_NEW_TOKENS
from malora_dist.evaluation.code_execution import code_complete
from malora_dist.evaluation.packing import OptionTree, TreeBatch, tree_batches
from malora_dist.inference.decoding import StopWhen
from malora_dist.runtime.groups import ParallelGroups

# Tokens a greedy answer may run past its target's length before it is cut off (it is wrong then).
GENERATION_SLACK = 4


@dataclass
class Item:
    """One example to score: ``key`` = (task index, example index) in the report."""

    key: tuple
    prompt: str
    options: list[str]  # the scored continuations (multiple choice); [] for generation
    gold: int  # index into ``options``; -1 for generation
    target: str  # the gold continuation, or the generation target
    where: str
    metric: str = "multiple_choice"
    reference: dict = field(default_factory=dict)  # what the metric compares a generated answer with
    max_new_tokens: Optional[int] = None  # None: the target's length + GENERATION_SLACK
    done: Optional[Callable[[str], bool]] = None  # decoding also stops once done(answer so far)


@dataclass
class ItemResult:
    """scores: per option (multiple choice); choice: the best option's index (-1 for generation);
    prediction: its continuation, or the generated text; truncated: the prompt lost tokens."""

    scores: list[float]
    choice: int
    prediction: str
    truncated: bool


def make_item(key: tuple, example, style: str, metric: str, chat_tokenizer: Any) -> Item:
    """The scored strings of an example, from the data package's prompt builders: its options in
    ``style`` for ``multiple_choice``, else a prompt to answer, with the metric's decoding budget."""
    if metric != "multiple_choice":
        done = partial(code_complete, entry_point=example.reference["problem"]["entry_point"]) \
            if metric == "pass_at_1" else None
        return Item(key, example.prompt, [], -1, example.target, example.where, metric, example.reference,
                    MAX_NEW_TOKENS.get(metric), done)
    mc = example.mc
    options = option_continuations(mc, style, chat_tokenizer)
    return Item(key, build_prompt(mc, style, chat_tokenizer), options, mc.gold_index, options[mc.gold_index],
                example.where)


# ---- the forward ---------------------------------------------------------------------------------
def tree_attention_masks(config, allowed: torch.Tensor, position_ids: torch.Tensor):
    """The HF attention mask for the tree mask ``allowed`` (B, 1, S, S): a custom 4-D mask reaches
    every layer unchanged, so sliding-window layers get it narrowed by position distance — as
    HF's mapping {layer type: mask} where the config names layer types, else (Mistral: every
    layer slides) as the one mask."""
    window = getattr(config, "sliding_window", None)
    if window is None or window >= allowed.shape[-1]:
        return allowed
    windowed = allowed & (position_ids[:, None, :, None] - position_ids[:, None, None, :] < window)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return windowed
    return {"full_attention": allowed, "sliding_attention": windowed}


def option_logprobs(model, batch: TreeBatch, device) -> torch.Tensor:
    """log p(target) at every scored position of ``batch``: the LM head runs on those rows only."""
    position_ids = batch.position_ids.to(device)
    mask = tree_attention_masks(model.config, batch.allowed.to(device), position_ids)
    local = model.logits_at(batch.score_rows.to(device), batch.score_cols.to(device),
                            batch.input_ids.to(device), position_ids, mask)
    logits = model.gather_logits(local).float()
    return F.log_softmax(logits, dim=-1).gather(-1, batch.targets.to(device)[:, None])[:, 0]


def _dummy_forward(model, device) -> None:
    model(torch.zeros(1, 1, dtype=torch.long, device=device))


def lockstep_rounds(count: int, groups: ParallelGroups, device) -> int:
    """The largest ``count`` over the dp group: the rounds every dp rank runs."""
    if groups.dp_group is None:
        return count
    t = torch.tensor([count], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=groups.dp_group)
    return int(t.item())


# ---- multiple choice -----------------------------------------------------------------------------
def option_trees(items: list[Item], tokenizer: Any, chat: bool, max_len: int) -> tuple[list[OptionTree], set]:
    """Token trees of multiple-choice items; a prompt too long for ``max_len`` tokens together
    with its longest option loses tokens from its left (as training truncates), keeping ≥ 1."""
    prompts = encode_prompts(tokenizer, [i.prompt for i in items], chat)
    continuations = encode_continuations(tokenizer, [o for i in items for o in i.options])
    trees, truncated, at = [], set(), 0
    for item, prompt in zip(items, prompts):
        options = continuations[at:at + len(item.options)]
        at += len(item.options)
        empty = [text for text, ids in zip(item.options, options) if not ids]
        if empty or not prompt:
            what = f"the option(s) {empty}" if empty else f"the prompt {item.prompt!r}"
            raise DataError(f"{item.where}: {what} tokenise(s) to nothing, so it cannot be scored")
        room = max(1, max_len - max(map(len, options)))
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room:]
            truncated.add(item.key)
        trees.append(OptionTree(item.key, list(prompt), [list(o) for o in options]))
    return trees, truncated


@torch.no_grad()
def score_batch(model, batch: TreeBatch, device) -> torch.Tensor:
    """The summed log-probability of every option of ``batch`` (in ``batch.options`` order)."""
    logprobs = option_logprobs(model, batch, device)
    sums = torch.zeros(len(batch.options), dtype=torch.float64, device=device)
    return sums.index_add_(0, batch.option_of_score.to(device), logprobs.double()).cpu()


@torch.no_grad()
def score_multiple_choice(model, items: list[Item], tokenizer: Any, chat: bool, max_len: int, groups: ParallelGroups,
                          device, row_tokens: int, rows_per_batch: int, progress=None) -> dict:
    """{key: ItemResult} for this rank's multiple-choice ``items`` (dp ranks call it together)."""
    trees, truncated = option_trees(items, tokenizer, chat, max_len)
    batches = tree_batches(trees, row_tokens, rows_per_batch)
    scores: dict = {item.key: [0.0] * len(item.options) for item in items}
    for b in range(lockstep_rounds(len(batches), groups, device)):
        if b >= len(batches):
            _dummy_forward(model, device)
            continue
        batch = batches[b]
        for (key, j), value in zip(batch.options, score_batch(model, batch, device).tolist()):
            scores[key][j] = value
        if progress is not None:
            progress.update(len({key for key, _ in batch.options}))
    results = {}
    for item in items:
        s = scores[item.key]
        best = max(range(len(s)), key=s.__getitem__)  # the first of equal scores
        results[item.key] = ItemResult(s, best, item.options[best], item.key in truncated)
    return results


# ---- generation ----------------------------------------------------------------------------------
@torch.no_grad()
def generate_answers(model, items: list[Item], tokenizer: Any, chat: bool, max_len: int, groups: ParallelGroups,
                     device, progress=None) -> dict:
    """{key: ItemResult} with the greedy answer (text up to EOS or a stop string, stripped) of
    each generation item.

    One example at a time, by the model's ``generate`` (HF's, with its KV cache). Decoding stops
    at EOS, once the item's ``done`` holds (a code answer has ended), or after the item's budget
    (its metric's ``MAX_NEW_TOKENS``, or the target's length + ``GENERATION_SLACK`` for exact
    match); with several ranks, ``generate`` keeps every rank's forwards in step until all have
    stopped (one tiny all-reduce per token), and a rank without an example left decodes a
    one-token dummy prompt meanwhile. A code completion keeps its leading whitespace (indentation);
    ``code_execution`` cuts it where its code ends.
    """
    eos = eos_id(tokenizer)
    prompts = encode_prompts(tokenizer, [i.prompt for i in items], chat)
    target_lengths = [len(t) for t in encode_continuations(tokenizer, [i.target for i in items])]
    synced = dist.get_world_size() > 1
    results = {}
    for r in range(lockstep_rounds(len(items), groups, device)):
        if r >= len(items):
            model.generate(torch.zeros(1, 1, dtype=torch.long, device=device), 1, eos, synced=synced)
            continue
        item = items[r]
        budget = item.max_new_tokens or target_lengths[r] + GENERATION_SLACK
        ids, truncated = list(prompts[r]), False
        room = max(1, max_len - budget)
        if len(ids) > room:
            ids, truncated = ids[-room:], True
        stop = [StopWhen(tokenizer, len(ids), item.done)] if item.done is not None else None
        out = model.generate(torch.tensor([ids], device=device), budget, eos, synced=synced, stopping_criteria=stop)
        new = out[0, len(ids):].tolist()
        if eos in new:
            new = new[:new.index(eos)]
        text = tokenizer.decode(new, skip_special_tokens=True)
        text = text.rstrip() if item.metric == "pass_at_1" else text.strip()
        results[item.key] = ItemResult([], -1, text, truncated)
        if progress is not None:
            progress.update(1)
    return results

