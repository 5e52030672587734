"""Split full adapter tensors into this rank's shard, and gather shards back into full tensors.

Layout rules come from the parameter tags (``malora_dist.adapters.tags``): ep-sharded expert tensors
are split on dim 0 across the EP group (rank e owns experts [e·N/ep, (e+1)·N/ep)), tp-sharded tensors on their
``tp_dim`` across the tp group. Keys of full tensors never depend on the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from malora_dist.adapters.tags import is_ep_sharded, tp_dim
from malora_dist.runtime.groups import ParallelGroups


def local_slice(full: torch.Tensor, param: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """This rank's part of ``full`` for a parameter tagged like ``param``."""
    part = full
    if is_ep_sharded(param):
        part = part.chunk(groups.ep, dim=0)[groups.ep_rank]
    dim = tp_dim(param)
    if dim is not None and groups.tp > 1:
        part = part.chunk(groups.tp, dim=dim)[groups.tp_rank]
    return part.contiguous()


def _gather(t: torch.Tensor, dim: int, size: int, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if size == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def gather_tp(value: torch.Tensor, param: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """``value`` (laid out like ``param``) with its tp-sharded dim gathered; experts stay local."""
    dim = tp_dim(param)
    return value.detach() if dim is None else _gather(value.detach(), dim, groups.tp, groups.tp_group)


def slice_tp(full: torch.Tensor, param: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """The inverse of ``gather_tp``: this tp rank's part of a tensor that is full on the tp dim."""
    dim = tp_dim(param)
    if dim is None or groups.tp == 1:
        return full
    return full.chunk(groups.tp, dim=dim)[groups.tp_rank].contiguous()


def full_tensor(param: torch.Tensor, groups: ParallelGroups, value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full tensor of a (possibly sharded) parameter, or of ``value`` laid out like it (its
    gradient, say); a collective on the tp and EP groups."""
    full = (param if value is None else value).detach()
    dim = tp_dim(param)
    if dim is not None:
        full = _gather(full, dim, groups.tp, groups.tp_group)
    if is_ep_sharded(param):
        full = _gather(full, 0, groups.ep, groups.ep_group)
    return full
