"""Gradient reduction and the global gradient norm (docs/ARCHITECTURE.md §5 (gradient reduction)).

Each dp rank's loss is its summed token loss divided by the global number of loss tokens, so the
gradients are **summed**: replicated parameters (S_A, router, plain LoRA, and experts placed on
every rank) over dp, ep-sharded expert parameters (P_t, B̄_t) over the expert-data-parallel group.
Never divide experts by edp.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from malora_dist.adapters.tags import is_ep_sharded, tp_dim
from malora_dist.runtime.groups import ParallelGroups


def _all_reduce_flat(grads: list, group: Optional[dist.ProcessGroup]) -> None:
    """One all-reduce per group and dtype: a flat bucket instead of one call per tensor."""
    if group is None or not grads:
        return
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for bucket in by_dtype.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(reduced)


def reduce_gradients(params: Iterable[torch.nn.Parameter], groups: ParallelGroups) -> None:
    """Sum gradients over the group that holds each parameter's replicas."""
    replicated, experts = [], []
    for p in params:
        if p.grad is None:  # an unused parameter still joins the collective, with zeros
            p.grad = torch.zeros_like(p)
        (experts if is_ep_sharded(p) else replicated).append(p.grad)
    _all_reduce_flat(replicated, groups.dp_group)
    _all_reduce_flat(experts, groups.edp_group)


def global_grad_norm(params: Iterable[torch.nn.Parameter], groups: ParallelGroups) -> torch.Tensor:
    """The L2 norm of the full gradient, each parameter counted once.

    Squared norms of tp-sharded parameters are summed over tp, those of ep-sharded experts over the
    EP group; parameters replicated on both axes are identical on every rank and count once.
    """
    params = [p for p in params if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    # [not expert & tp-replicated, not expert & tp-sharded, expert & tp-replicated, expert & tp-sharded]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for p in params:
        index = 2 * int(is_ep_sharded(p)) + int(tp_dim(p) is not None and groups.tp > 1)
        sums[index] += p.grad.detach().double().pow(2).sum()
    if groups.tp_group is not None:
        tp_part = sums[[1, 3]].clone()
        dist.all_reduce(tp_part, group=groups.tp_group)
        sums[1], sums[3] = tp_part[0], tp_part[1]
    if groups.ep_group is not None:
        ep_part = sums[2:].clone()
        dist.all_reduce(ep_part, group=groups.ep_group)
        sums[2:] = ep_part
    return sums.sum().sqrt().float()


def clip_grad_norm_(params: list, max_norm: float, groups: ParallelGroups) -> torch.Tensor:
    """Scale gradients so that the global norm is at most ``max_norm``; return the norm before clipping."""
    norm = global_grad_norm(params, groups)
    if max_norm and max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
    return norm
