"""One rank of an N-rank world without the hardware: torch's fake process group.

Every collective returns at once without touching data, so the real code that builds groups,
shards the base and places experts runs unchanged for any rank of any world size. The groups are
built by ``ParallelGroups.build``, as in a real launch, less megatron's CPU-side gloo copies (which
nothing here uses and a fake store cannot create).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from malora_dist.runtime.groups import ParallelGroups


@contextmanager
def fake_rank(world_size: int, rank: int, tp: int, ep: int, num_experts):
    """``ParallelGroups`` of ``rank`` in a fake world of ``world_size``; torn down on exit."""

    if dist.is_initialized():
        raise RuntimeError("the planner builds its own fake world: run it outside a started process group")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    groups = None
    try:
        groups = ParallelGroups.build(tp, ep, num_experts, megatron_gloo_groups=False)
        yield groups
    finally:
        if groups is not None:
            groups.destroy()
        dist.destroy_process_group()


def distinct_positions(world_size: int, tp: int, ep: int) -> dict[int, int]:
    """{first global rank: how many ranks share its position}. Ranks with the same (tp rank, ep
    rank) hold the same shapes: megatron's layout puts tp innermost, then dp, and the EP group runs
    over consecutive dp ranks (dp rank mod ep)."""
    positions: dict[tuple, list[int]] = {}
    for rank in range(world_size):
        tp_rank, dp_rank = rank % tp, rank // tp
        positions.setdefault((tp_rank, dp_rank % ep), []).append(rank)
    return {ranks[0]: len(ranks) for ranks in positions.values()}
