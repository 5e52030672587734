"""Cost terms of the adapter's parts, for the ``auto`` placement (docs/ARCHITECTURE.md §6 (placement)).

Each part reports what it costs in a few currencies, priced by the measured link and device
(``malora_dist.parallel.placement.LinkModel``): collectives (latency each), bytes on the
expert-parallel link, gradient all-reduce bytes on the dp link, small ops (a fixed cost each:
dispatch, launch), bytes read and written by ops that move data (copy bandwidth) and matmul FLOPs
(matmul rate). The local work is not hand-counted: ``count_work`` runs the part's own forward and
backward under a dispatch mode and counts the ATen ops it issues,
so the terms follow the code.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "_grouped_mm"}
# Ops that do no work on the data: views, metadata, allocation without a fill.
_FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "detach", "alias", "as_strided",
         "split", "split_with_sizes", "unbind", "slice", "select", "squeeze", "unsqueeze", "empty", "empty_like",
         "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "unsafe_split",
         "_reshape_alias", "reshape", "sym_size", "sym_stride", "sym_numel", "is_same_size"}


@dataclass
class CostTerms:
    collectives: float = 0.0
    link_bytes: float = 0.0  # on the expert-parallel group's link
    reduce_bytes: float = 0.0  # gradient all-reduce bytes on the dp group's link
    ops: float = 0.0
    copy_bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: "CostTerms") -> "CostTerms":
        return CostTerms(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> "CostTerms":
        return CostTerms(*(getattr(self, f.name) * factor for f in fields(self)))

    def seconds(self, link) -> float:
        return (self.collectives * link.latency_s + self.link_bytes / link.bytes_per_s
                + self.reduce_bytes / link.reduce_bytes_per_s + self.ops * link.op_s
                + self.copy_bytes / link.copy_bytes_per_s + self.flops / link.flops_per_s)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class WorkCounter(TorchDispatchMode):
    """Counts the ATen ops that do work, their matmul FLOPs and the bytes the others read and write."""

    def __init__(self):
        super().__init__()
        self.terms = CostTerms()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        self.names.append(name)
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        flat_out = torch.utils._pytree.tree_leaves(out)
        if name.rstrip("_") in _MATMULS:
            # the two factors: the last two tensors (addmm: the first is the added term), or grouped_mm's
            # first two (its offsets follow)
            operands = [t for t in flat_in if isinstance(t, torch.Tensor)]
            a, b = operands[:2] if name == "_grouped_mm" else operands[-2:]
            self.terms.flops += 2 * a.numel() * b.shape[-1]
        else:
            self.terms.copy_bytes += _bytes(flat_in) + _bytes(flat_out)
        self.terms.ops += 1
        return out


def count_work(fn) -> CostTerms:
    """The work of ``fn()`` (forward and backward, as ``fn`` runs them)."""
    with WorkCounter() as counter:
        fn()
    return counter.terms
