"""The work of one micro-batch's forward and backward, counted from the ATen ops the real model
issues on the meta device: matmul FLOPs, bytes each op reads and writes, the number of ops, and
every collective with its group and bytes (the tensor-parallel reductions of the base and of the
adapters come out of the model itself, as ``c10d`` ops under the fake process group).

Like ``adapters.cost.count_work``, nothing is hand-counted: the terms follow the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from malora_dist.adapters.cost import _FREE, _MATMULS


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@dataclass
class Collective:
    kind: str  # the c10d op: allreduce_, allgather_, ...
    group_ranks: tuple
    bytes: int


@dataclass
class OpWork:
    flops: float = 0.0
    bytes: float = 0.0


@dataclass
class PhaseWork:
    ops: list = field(default_factory=list)  # OpWork per op that does work
    collectives: list = field(default_factory=list)

    def seconds(self, peak_flops: float, memory_bytes_per_s: float, op_s: float) -> float:
        """Each op at its roofline: the slower of its FLOPs at peak and its bytes at the memory's rate."""
        return sum(max(op.flops / peak_flops, op.bytes / memory_bytes_per_s) + op_s for op in self.ops)

    @property
    def flops(self) -> float:
        return sum(op.flops for op in self.ops)


class PhaseCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.work = PhaseWork()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        if func.namespace == "c10d":
            group = next((a for a in flat_in if isinstance(a, dist.ProcessGroup)), None)
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else ()
            self.work.collectives.append(Collective(name, ranks, _bytes(flat_in)))
            return out
        moved = _bytes(flat_in) + _bytes(torch.utils._pytree.tree_leaves(out))
        flops = 0.0
        if name.rstrip("_") in _MATMULS:
            operands = [t for t in flat_in if isinstance(t, torch.Tensor)]
            a, b = operands[:2] if name == "_grouped_mm" else operands[-2:]
            flops = 2 * a.numel() * b.shape[-1]
        self.work.ops.append(OpWork(flops, moved))
        return out


def count_phase(fn) -> PhaseWork:
    with PhaseCounter() as counter:
        fn()
    return counter.work
