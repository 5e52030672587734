"""Task mixing and the global batch of every step, as a pure function of (seed, step).

The training stream is a sequence of epochs. An epoch has as many slots as there are training
sequences (M), allotted to the tasks by their mixing shares (largest remainder, so the proportions
are exact per epoch up to one sequence); task t's slots take the next items of its own stream, an
endless run of fresh permutations of its sequences, so an up-sampled task cycles through all its
sequences before repeating one, and a down-sampled task sees all of them over several epochs.
The epoch's slots are then shuffled. Step s takes stream positions [s·G, (s+1)·G): batches may
straddle epochs. Nothing depends on the number of ranks: ``local_micro_batches`` only cuts the
global batch, so any dp layout sees the same global batch (docs/ARCHITECTURE.md §7.2
(training-level parity)).
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Sequence

import torch


def seeded_generator(*key) -> torch.Generator:
    """A torch generator seeded from ``key`` (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def mixing_probabilities(
    sizes: Sequence[int], weights: Sequence[float], mixing: str, temperature: Optional[float] = None
) -> list[float]:
    """The share of training examples each task gets: p ∝ size·w (proportional), w (uniform) or
    size^(1/T)·w (temperature)."""
    if mixing == "proportional":
        raw = [n * w for n, w in zip(sizes, weights)]
    elif mixing == "uniform":
        raw = list(weights)
    elif mixing == "temperature":
        raw = [n ** (1.0 / temperature) * w for n, w in zip(sizes, weights)]
    else:
        raise ValueError(f"unknown mixing {mixing!r}: use proportional, uniform or temperature")
    total = sum(raw)
    return [r / total if total else 0.0 for r in raw]  # all zero: no task is trained on (eval_only)


def sequence_shares(example_probs: Sequence[float], num_examples: Sequence[int],
                    num_sequences: Sequence[int]) -> list[float]:
    """The share of *sequences* per task that gives each task ``example_probs`` of the examples:
    a packed sequence of task t holds num_examples/num_sequences examples on average."""
    raw = [p * s / e if e else 0.0 for p, e, s in zip(example_probs, num_examples, num_sequences)]
    total = sum(raw)
    return [r / total if total else 0.0 for r in raw]


def allocate(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split by ``shares`` into integers summing to ``total`` (largest remainder; ties
    go to the lower index)."""
    exact = [total * s for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class GlobalBatchSampler:
    """Global batches of sequence indices for every step, and each rank's micro-batches of them.

    num_sequences: sequences per task (task t's indices follow task t−1's, as in ``PackedSequences``).
    shares: the fraction of the stream's sequences per task (``sequence_shares``).
    """

    def __init__(self, num_sequences: Sequence[int], shares: Sequence[float], global_batch_size: int, seed: int):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be ≥ 1, got {global_batch_size}")
        self.num_sequences = list(num_sequences)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch_size = sum(self.num_sequences)
        self.per_epoch = allocate(self.epoch_size, shares)
        starved = [t for t, (m, q) in enumerate(zip(self.per_epoch, shares)) if m == 0 and q > 0]
        if starved:
            raise ValueError(
                f"task(s) {starved} get no sequence in an epoch of {self.epoch_size} sequences: "
                "raise their data.tasks[].weight or use another data.mixing"
            )
        self.offsets = [sum(self.num_sequences[:t]) for t in range(len(self.num_sequences))]
        self._plans: dict[int, torch.Tensor] = {}

    @property
    def steps_per_epoch(self) -> float:
        return self.epoch_size / self.global_batch_size

    def steps_for_epochs(self, epochs: float) -> int:
        """Steps that cover ``epochs`` epochs (the last batch may reach into the next epoch)."""
        return math.ceil(epochs * self.epoch_size / self.global_batch_size)

    def global_batch(self, step: int) -> list[int]:
        """The ``global_batch_size`` sequence indices of ``step``: a function of (seed, step) only."""
        if step < 0:
            raise ValueError(f"step must be ≥ 0, got {step}")
        positions = torch.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        epochs = positions // self.epoch_size
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            here = epochs == epoch
            out[here] = self._plan(epoch)[positions[here] % self.epoch_size]
        return out.tolist()

    def local_micro_batches(self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[list[int]]:
        """Rank ``dp_rank``'s contiguous 1/dp_size slice of the global batch, cut into micro-batches."""
        per_step = dp_size * micro_batch_size
        if dp_size < 1 or micro_batch_size < 1 or self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} must be divisible by dp_size × micro_batch_size "
                f"= {dp_size} × {micro_batch_size} = {per_step}: change the global batch size, the micro-batch "
                "size or the data-parallel size"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        local = self.global_batch_size // dp_size
        mine = self.global_batch(step)[dp_rank * local : (dp_rank + 1) * local]
        return [mine[i : i + micro_batch_size] for i in range(0, local, micro_batch_size)]

    def _plan(self, epoch: int) -> torch.Tensor:
        """The shuffled sequence indices of one epoch (the last two are cached)."""
        if epoch not in self._plans:
            parts = [
                self._task_items(t, epoch * m, m) + self.offsets[t]
                for t, m in enumerate(self.per_epoch)
                if m
            ]
            plan = torch.cat(parts)
            plan = plan[torch.randperm(len(plan), generator=seeded_generator(self.seed, "epoch", epoch))]
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = plan
        return self._plans[epoch]

    def _task_items(self, task: int, start: int, count: int) -> torch.Tensor:
        """Items [start, start+count) of task ``task``'s stream of fresh permutations."""
        n = self.num_sequences[task]
        positions = torch.arange(start, start + count)
        passes = positions // n
        out = torch.empty_like(positions)
        for p in passes.unique().tolist():
            here = passes == p
            perm = torch.randperm(n, generator=seeded_generator(self.seed, "task", task, p))
            out[here] = perm[positions[here] % n]
        return out
