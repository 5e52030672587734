"""Process groups for ``world = dp × tp`` with expert parallelism ``ep | dp`` (docs/ARCHITECTURE.md
§3.1 (groups)).

One explicit object with named axes is passed to the code that needs it; nothing else reads
megatron-core's globals. The groups themselves are built by megatron-core's ``parallel_state`` so
that the layout is the one megatron users know (tp innermost, then dp; the EP group spans dp ranks
that share a tp rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist
from megatron.core import parallel_state as ps


def validate_layout(world_size: int, tp: int, ep: int, num_experts: Optional[int] = None) -> int:
    """Check a layout before any process group exists; return dp. Errors say how to fix it."""
    for name, value in (("parallel.tp", tp), ("parallel.ep", ep)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % tp:
        raise ValueError(
            f"parallel.tp={tp} does not divide the world size {world_size}: "
            f"choose tp from {_divisors(world_size)} or change the number of processes"
        )
    dp = world_size // tp
    if dp % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide dp = world/tp = {world_size}/{tp} = {dp}: "
            f"choose ep from {_divisors(dp)}"
        )
    if num_experts is not None and num_experts % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide adapter.num_experts={num_experts}: "
            f"choose ep from {[d for d in _divisors(dp) if num_experts % d == 0]}"
        )
    return dp


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelGroups:
    """Sizes, this process's coordinates and the process groups of each named axis.

    A group is ``None`` when its axis has size 1 (no communication is needed on it).
    """

    tp: int = 1
    dp: int = 1
    ep: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    edp_rank: int = 0
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    edp_group: Optional[dist.ProcessGroup] = None

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def world(self) -> int:
        return self.dp * self.tp

    @classmethod
    def single(cls) -> "ParallelGroups":
        """The layout of one process: every axis has size 1."""
        return cls()

    @classmethod
    def build(cls, tp: int = 1, ep: int = 1, num_experts: Optional[int] = None,
              timeout_s: Optional[float] = None, megatron_gloo_groups: bool = True) -> "ParallelGroups":
        """Create the groups through megatron-core on the already initialised default group.

        ``timeout_s`` is the collective timeout of the new groups: megatron otherwise gives them
        its own 30 minutes, and a frozen peer would hang every dp all-reduce that long.
        ``megatron_gloo_groups``: megatron's CPU-side copies of its groups, which nothing here uses;
        the planner's fake process group cannot create them (``malora_dist.plan.fake_world``).
        """

        world = dist.get_world_size()
        dp = validate_layout(world, tp, ep, num_experts)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        # megatron's default expert tensor parallelism (= tp) makes its expert groups follow our
        # rule: the EP group spans dp ranks that share a tp rank and the expert-dp group is dp / ep.
        timeout = {} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                     create_gloo_process_groups=megatron_gloo_groups, **timeout)

        def group_or_none(size, group):
            return group if size > 1 else None

        return cls(
            tp=tp,
            dp=dp,
            ep=ep,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            ep_rank=ps.get_expert_model_parallel_rank(),
            edp_rank=ps.get_expert_data_parallel_rank(),
            tp_group=group_or_none(tp, ps.get_tensor_model_parallel_group()),
            dp_group=group_or_none(dp, ps.get_data_parallel_group()),
            ep_group=group_or_none(ep, ps.get_expert_model_parallel_group()),
            edp_group=group_or_none(dp // ep, ps.get_expert_data_parallel_group()),
        )

    def destroy(self) -> None:

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
