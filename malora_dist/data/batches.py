"""Tokenised examples → fixed-length sequences (packed or padded) → batches of tensors.

A sequence holds examples of one task only, so that each sequence has one ``task_id`` and the
mixer can pick sequences by task. Inside a sequence every example is a segment: ``segment_ids``
1, 2, … (padding 0), ``position_ids`` restarting at 0 in each segment, and attention must stay
inside a segment (``segment_causal_mask``; the model derives the same mask from the restarting
``position_ids``, as Hugging Face's attention does for packed sequences). Labels are aligned with
``input_ids`` (not shifted), as Hugging Face causal LMs take them: the loss at position t predicts
``labels[t]`` from the tokens before it. The first token of every segment has label -100 (a prompt
token), so a shifted loss never predicts across a segment boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from malora_dist.data.tokenize import IGNORE_INDEX, TokenizedExample

BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids", "task_ids")
PAD_SEGMENT = 0


@dataclass
class PackedSequences:
    """Fixed-length training sequences, built on demand from their examples.

    examples: the tokenised examples; sequences: for each sequence, the indices of its examples
    (all of one task). Sequences of task t occupy a contiguous index range, in task order.
    """

    examples: list[TokenizedExample]
    sequences: list[list[int]]
    seq_len: int
    pad_id: int

    def __len__(self) -> int:
        return len(self.sequences)

    def task_of(self, index: int) -> int:
        return self.examples[self.sequences[index][0]].task_id

    def count_by_task(self, num_tasks: int) -> tuple[list[int], list[int]]:
        """(sequences, examples) per task."""
        seqs, exs = [0] * num_tasks, [0] * num_tasks
        for members in self.sequences:
            task = self.examples[members[0]].task_id
            seqs[task] += 1
            exs[task] += len(members)
        return seqs, exs

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The sequences ``indices`` as a dict of (B, seq_len) LongTensors, keys ``BATCH_KEYS``.

        Padding: ``pad_id`` tokens, label -100, segment 0, positions restarting at 0, and the
        sequence's task id (so a per-task mean over labelled tokens is unaffected).
        """
        shape = (len(indices), self.seq_len)
        out = {
            "input_ids": torch.full(shape, self.pad_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
            "segment_ids": torch.full(shape, PAD_SEGMENT, dtype=torch.long),
            "task_ids": torch.empty(shape, dtype=torch.long),
        }
        for row, index in enumerate(indices):
            members = self.sequences[index]
            out["task_ids"][row] = self.examples[members[0]].task_id
            start = 0
            for segment, member in enumerate(members, 1):
                example = self.examples[member]
                end = start + len(example.input_ids)
                out["input_ids"][row, start:end] = torch.tensor(example.input_ids)
                out["labels"][row, start:end] = torch.tensor(example.labels)
                out["position_ids"][row, start:end] = torch.arange(end - start)
                out["segment_ids"][row, start:end] = segment
                start = end
            out["position_ids"][row, start:] = torch.arange(self.seq_len - start)
        return out


def pack_examples(
    examples: list[TokenizedExample], num_tasks: int, seq_len: int, packing: bool, pad_id: int
) -> PackedSequences:
    """Group ``examples`` (each ≤ ``seq_len`` tokens) into sequences, task by task, in their order.

    With ``packing``, next-fit: an example joins the current sequence of its task while it fits,
    else it starts a new one. Next-fit keeps the file order (a first-fit-decreasing packer fills
    better but groups long examples with long ones). Without packing, one example per sequence.
    """
    by_task: list[list[int]] = [[] for _ in range(num_tasks)]
    for i, example in enumerate(examples):
        if len(example.input_ids) > seq_len:
            raise ValueError(f"example {i} has {len(example.input_ids)} tokens > seq_len {seq_len}")
        by_task[example.task_id].append(i)
    sequences: list[list[int]] = []
    for members in by_task:
        used = seq_len  # forces a new sequence for the task's first example
        for i in members:
            length = len(examples[i].input_ids)
            if packing and used + length <= seq_len:
                sequences[-1].append(i)
                used += length
            else:
                sequences.append([i])
                used = length
    return PackedSequences(examples, sequences, seq_len, pad_id)


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, L, L) attention mask, True where query i may attend key j: j ≤ i and the
    same segment. Padding attends to padding only, so no row is empty (no NaN in softmax)."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]
