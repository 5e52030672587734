"""Multiple-choice examples as token trees, packed into rows with a tree attention mask.

An example's options share its prompt, so the prompt is computed once: a row holds
``[prompt, option 1, option 2, …]`` and each option's tokens attend to the prompt and to their own
earlier tokens only, with positions that continue from the prompt's end. Each option therefore
sees exactly the sequence ``prompt + option`` it would see alone, and the prompt is not recomputed
per option (2.5–3× fewer tokens on 4-option tasks). Several examples share a row (attention never
crosses examples) and rows of a batch are right-padded; padding attends only to padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable

import torch

PAD_GROUP = -1


@dataclass
class OptionTree:
    """One example: its ``prompt`` token ids and each option's continuation ids (non-empty)."""

    key: Hashable
    prompt: list[int]
    options: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt) + sum(len(o) for o in self.options)


@dataclass
class TreeBatch:
    """input_ids, position_ids: (B, S); allowed: (B, 1, S, S) bool, True = may attend.
    score_rows, score_cols: the positions whose next-token log-probability is scored, and
    targets: the token each one must predict; option_of_score: which entry of ``options`` (the
    (key, option index) pairs of this batch) each scored position belongs to."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    score_rows: torch.Tensor
    score_cols: torch.Tensor
    targets: torch.Tensor
    option_of_score: torch.Tensor
    options: list


def plan_rows(trees: list[OptionTree], row_tokens: int) -> list[list[OptionTree]]:
    """First-fit decreasing: longest trees first, each into the first row with room (a tree
    longer than ``row_tokens`` gets a row of its own). Deterministic."""
    rows: list[list[OptionTree]] = []
    room: list[int] = []
    for tree in sorted(trees, key=len, reverse=True):
        for i, free in enumerate(room):
            if len(tree) <= free:
                rows[i].append(tree)
                room[i] -= len(tree)
                break
        else:
            rows.append([tree])
            room.append(max(row_tokens, len(tree)) - len(tree))
    return rows


def tree_batches(trees: list[OptionTree], row_tokens: int, rows_per_batch: int) -> list[TreeBatch]:
    rows = sorted(plan_rows(trees, row_tokens), key=lambda r: sum(map(len, r)), reverse=True)
    return [_batch(rows[i:i + rows_per_batch]) for i in range(0, len(rows), rows_per_batch)]


def _batch(rows: list[list[OptionTree]]) -> TreeBatch:
    width = max(sum(map(len, row)) for row in rows)
    shape = (len(rows), width)
    ids = torch.zeros(shape, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    group = torch.full(shape, PAD_GROUP, dtype=torch.long)
    branch = torch.zeros(shape, dtype=torch.long)  # 0: prompt (or padding), j + 1: option j
    score_rows, score_cols, targets, option_of_score, options = [], [], [], [], []
    for r, row in enumerate(rows):
        start = 0
        for g, tree in enumerate(row):
            p = len(tree.prompt)
            ids[r, start:start + p] = torch.tensor(tree.prompt)
            pos[r, start:start + p] = torch.arange(p)
            group[r, start:start + len(tree)] = g
            at = start + p
            for j, option in enumerate(tree.options):
                n = len(option)
                ids[r, at:at + n] = torch.tensor(option)
                pos[r, at:at + n] = torch.arange(p, p + n)
                branch[r, at:at + n] = j + 1
                # option token i is predicted at the token before it: the prompt's last, then its own
                score_cols.extend([start + p - 1] + list(range(at, at + n - 1)))
                score_rows.extend([r] * n)
                targets.extend(option)
                option_of_score.extend([len(options)] * n)
                options.append((tree.key, j))
                at += n
            start = at
    allowed = (
        (group[:, :, None] == group[:, None, :])
        & (pos[:, None, :] <= pos[:, :, None])
        & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None]))
    )
    return TreeBatch(
        input_ids=ids, position_ids=pos, allowed=allowed[:, None],
        score_rows=torch.tensor(score_rows), score_cols=torch.tensor(score_cols),
        targets=torch.tensor(targets), option_of_score=torch.tensor(option_of_score), options=options,
    )
