"""This rank's experts over rows grouped per local expert, as one autograd Function.

The rows arrive grouped: on one rank sorted per local expert; from the all-to-all as they arrived,
source-major (ep × E groups: source rank, then local expert), with each expert's weights repeated
once per source (a few small tensors, once per step) — so the rows are never permuted to
expert-major and back, which saves the sort, two row gathers/scatters and their backward mirrors
that the reference parts run per exchange. Each expert t
computes ``y = (rows_t down_tᵀ) up_tᵀ`` — MALoRA's P_t then B̄_t on the d-wide rows S_A x, MoLoRA's
A_t then B_t on the n-wide rows x. Forward and backward each run as grouped products (one call per
projection, and per weight gradient, with the group offsets on the device) where
``torch.nn.functional.grouped_mm`` takes the operands, and as a loop over the few local experts
(their row counts are on the host already: the exchange read them) where it does not (fp64, or a
width whose stride is not a multiple of 16 bytes).

The rank r (MALoRA's r̄) is padded with zero columns to a multiple of 16 bytes once per optimizer
step (``GroupedWeights``): a bf16 r̄ = 12 would otherwise be refused by ``grouped_mm`` (its strides
must be multiples of 16 bytes) and fall back to the loop. The padding's products are exact zeros and
its gradients are dropped.

It keeps the rows and h = rows down_tᵀ (r numbers per row) for the backward, not y; its tensor-parallel
mappings are the experts part's: under a row-parallel base MoLoRA's h is a partial sum (A_t holds a
slice of n), all-reduced forward; under a column-parallel base B_t holds this rank's output
columns, so h's gradient is partial and is all-reduced backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.functional import grouped_mm

from malora_dist.adapters.exchange import RowBatch
from malora_dist.adapters.experts import GroupedExperts
from malora_dist.adapters.fused import WeightCache


@dataclass
class GroupedWeights:
    """The padded weights in both layouts the products read (contiguous, as ``grouped_mm`` wants):
    down_t (E, w, r_pad), so that ``rows_t @ down_t[t]`` is h, and down (E, r_pad, w) for the rows'
    gradient; up_t (E, r_pad, m) and up (E, m, r_pad) likewise; rank: r."""

    down_t: torch.Tensor
    down: torch.Tensor
    up_t: torch.Tensor
    up: torch.Tensor
    rank: int


def padded_rank(rank: int, dtype: torch.dtype) -> int:
    """r rounded up so that a row of r numbers spans a multiple of 16 bytes (``grouped_mm``'s rule)."""
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-rank // per_16_bytes) * per_16_bytes


def prepare_grouped_weights(down: torch.Tensor, up: torch.Tensor, dtype: torch.dtype,
                            sources: int = 1) -> GroupedWeights:
    """``sources`` > 1: the stack repeated once per source rank, for rows left in the source-major
    order they arrived in (``RowBatch.sources``): group g uses expert g % E."""
    with torch.no_grad():
        num, rank, width = down.shape
        padded = padded_rank(rank, dtype) if _grouped_dtype(dtype) else rank
        down_p = torch.zeros((num, padded, width), dtype=dtype, device=down.device)
        down_p[:, :rank].copy_(down)
        up_p = torch.zeros((num, up.shape[1], padded), dtype=dtype, device=up.device)
        up_p[:, :, :rank].copy_(up)
        if sources > 1:
            down_p, up_p = down_p.repeat(sources, 1, 1), up_p.repeat(sources, 1, 1)
        return GroupedWeights(down_p.transpose(1, 2).contiguous(), down_p, up_p.transpose(1, 2).contiguous(), up_p,
                              rank)


def _grouped_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


class HostCounts:
    """Rows per local expert as a host list, read from the device only if a loop needs them (the
    exchange has read them already; one rank's sorted rows have them on the device only)."""

    def __init__(self, batch: RowBatch):
        self._batch = batch
        self._counts = batch.host_counts

    def __call__(self) -> list:
        if self._counts is None:
            self._counts = self._batch.count_tensor.tolist()
        return self._counts


_grouped_mm_works = True


def _fits(*tensors: torch.Tensor) -> bool:
    """Every operand's rows span a multiple of 16 bytes and the dtype is one ``grouped_mm`` takes."""
    if not _grouped_mm_works or not _grouped_dtype(tensors[0].dtype):
        return False
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _call_grouped(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> Optional[torch.Tensor]:
    global _grouped_mm_works
    try:
        return grouped_mm(a, b, offs=offsets)
    except (RuntimeError, NotImplementedError):  # a build or layout it refuses: loop from now on
        _grouped_mm_works = False
        return None


def rows_times(rows: torch.Tensor, stacked: torch.Tensor, offsets: torch.Tensor, counts: HostCounts) -> torch.Tensor:
    """Per group t: ``rows_t @ stacked[t]`` → (R, ·)."""
    if _fits(rows, stacked):
        result = _call_grouped(rows, stacked, offsets)
        if result is not None:
            return result
    chunks = rows.split(counts())
    return torch.cat([chunk @ stacked[t] for t, chunk in enumerate(chunks)])


def weight_gradient(left: torch.Tensor, right: torch.Tensor, offsets: torch.Tensor, counts: HostCounts) -> torch.Tensor:
    """Per group t: ``left_tᵀ @ right_t`` → (E, ·, ·): an expert with no rows gets zeros."""
    if _fits(left, right):
        result = _call_grouped(left.t(), right, offsets)
        if result is not None:
            return result
    return torch.stack([a.t() @ b for a, b in zip(left.split(counts()), right.split(counts()))])


@dataclass(frozen=True)
class GroupedSpec:
    counts: HostCounts
    partial_h: bool  # h is a partial sum over tp (row base, MoLoRA's A_t): all-reduce forward
    partial_grad_h: bool  # h's gradient is partial over tp (column base): all-reduce backward
    tp_group: Optional[object] = None
    sources: int = 1  # groups per local expert (source ranks of source-major rows): their gradients sum


def _per_expert(grads: torch.Tensor, sources: int) -> torch.Tensor:
    """(sources·E, …) per-group gradients → (E, …): each expert's groups summed."""
    return grads if sources == 1 else grads.view(sources, -1, *grads.shape[1:]).sum(0)


class FusedGroupedExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: GroupedSpec, weights: GroupedWeights, rows, offsets, down, up):
        counts = spec.counts
        h = rows_times(rows, weights.down_t, offsets, counts)
        if spec.partial_h:
            dist.all_reduce(h, group=spec.tp_group)
        ctx.save_for_backward(rows, h, offsets)
        ctx.spec, ctx.weights = spec, weights
        ctx.param_dtypes = (down.dtype, up.dtype)
        return rows_times(h, weights.up_t, offsets, counts)

    @staticmethod
    def backward(ctx, grad_y):
        rows, h, offsets = ctx.saved_tensors
        spec, weights = ctx.spec, ctx.weights
        counts = spec.counts
        grad_y = grad_y.contiguous()
        grad_h = rows_times(grad_y, weights.up, offsets, counts)
        if spec.partial_grad_h:
            dist.all_reduce(grad_h, group=spec.tp_group)
        rank = weights.rank
        needs = ctx.needs_input_grad  # spec, weights, rows, offsets, down, up
        grad_up = grad_down = grad_rows = None
        # in the parameters' own layouts, (E, m, r) and (E, r, w): no transposed copy to accumulate
        if needs[5]:
            grad_up = _per_expert(weight_gradient(grad_y, h, offsets, counts), spec.sources)[:, :, :rank]
            grad_up = grad_up.to(ctx.param_dtypes[1])
        if needs[4]:
            grad_down = _per_expert(weight_gradient(grad_h, rows, offsets, counts), spec.sources)[:, :rank]
            grad_down = grad_down.to(ctx.param_dtypes[0])
        if needs[2]:
            grad_rows = rows_times(grad_h, weights.down, offsets, counts)
        return None, None, grad_rows, None, grad_down, grad_up


class FusedGroupedExperts(GroupedExperts):
    """``GroupedExperts`` whose forward and backward are ``FusedGroupedExpertsFunction``; the same
    parameters, file keys and results."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.caches: dict = {}  # by the batches' ``sources``: one value per layer in practice

    def forward(self, batch: RowBatch, out: Optional[torch.Tensor]) -> torch.Tensor:
        rows = batch.rows
        if batch.sources not in self.caches:
            self.caches[batch.sources] = WeightCache(functools.partial(prepare_grouped_weights, sources=batch.sources))
        weights = self.caches[batch.sources].get((self.down, self.up), rows.dtype)
        hooks = self.hooks
        spec = GroupedSpec(counts=HostCounts(batch), partial_h=self.contracts_n and hooks.mode == "row",
                           partial_grad_h=hooks.mode == "column", tp_group=hooks.group, sources=batch.sources)
        offsets = torch.cumsum(batch.count_tensor, 0).to(torch.int32)
        return FusedGroupedExpertsFunction.apply(spec, weights, rows.contiguous(), offsets, self.down, self.up)
