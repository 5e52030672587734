"""Experts parts: this rank's experts, stacked on dim 0 (local index; global = offset + local).

``down`` holds MALoRA's P_t (E, r̄, d) or MoLoRA's / LoRA's A_t (E, r, n); ``up`` holds B̄_t / B_t
(E, m, r). Parameters are fp32 master weights; the products run in the activations' dtype (as
autocast would), so a bf16 base gets bf16 adapter products.

- ``DenseExperts``: every local expert for every token, masked by the gates: one product into
  rank space, one masked product into the output (static shapes, no gather). Unrouted (token,
  expert) pairs get a zero gate, so their gradients are exact zeros and the result equals the
  grouped kernel's.
- ``GroupedExperts``: rows grouped per expert, a loop over the few local experts. An expert with no
  rows still runs (a zero-row matmul): its gradient is an exact zero, and every rank keeps issuing
  the same collectives.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.functional import grouped_mm

from malora_dist.adapters.accumulate import add_product
from malora_dist.adapters.dispatch import DenseBatch, RowBatch
from malora_dist.adapters.tensor_parallel import TensorParallelHooks


class _Experts(nn.Module):
    def __init__(self, down: torch.Tensor, up: torch.Tensor, contracts_n: bool, hooks: TensorParallelHooks):
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.contracts_n = contracts_n  # A_t contracts n, which a row-parallel base shards; P_t does not
        self.hooks = hooks

    def project_down(self, down: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ downᵀ`` with its tensor-parallel mappings; ``down`` is one expert's (r, w)
        matrix or all experts' stacked as (E·r, w)."""
        h = rows @ down.t().to(rows.dtype)
        if self.contracts_n:
            h = self.hooks.sum_partial(h)
        return self.hooks.into_sharded_up(h)

    def extra_repr(self) -> str:
        return f"local_experts={self.down.shape[0]}, rank={self.down.shape[1]}"


class DenseExperts(_Experts):
    """``scaling`` applies where there are no gates (LoRA: h is its smallest tensor)."""

    def __init__(self, down, up, contracts_n, hooks, scaling: float):
        super().__init__(down, up, contracts_n, hooks)
        self.scaling = scaling

    def forward(self, batch: DenseBatch, out: torch.Tensor) -> torch.Tensor:
        """``out`` with the gated experts' sum added."""
        num, rank, width = self.down.shape
        tokens = batch.inputs.shape[0]
        h = self.project_down(self.down.reshape(num * rank, width), batch.inputs)
        if batch.gates is None:
            h = self.scaling * h
        else:
            h = (h.view(tokens, num, rank) * batch.gates.unsqueeze(-1)).reshape(tokens, num * rank)
        # (m, E, r) in the output's dtype: the permute and the cast in one copy
        up = torch.empty((self.up.shape[1], num, rank), dtype=out.dtype, device=out.device).copy_(
            self.up.permute(1, 0, 2))
        return add_product(out, h.to(out.dtype), up.view(-1, num * rank).t())


def grouped_mm_fits(rows: torch.Tensor, *weights: torch.Tensor) -> bool:
    """``torch.nn.functional.grouped_mm`` takes fp32/bf16/fp16 (not fp64) operands whose strides are
    multiples of 16 bytes (checked in torch 2.13: a bf16 r̄ = 12 is refused); its CUDA fast path is
    bf16 on sm90+, elsewhere it loops over the groups itself."""
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = rows.element_size()
    return all(dim * size % 16 == 0 for w in weights for dim in w.shape[1:]) and rows.shape[-1] * size % 16 == 0


class GroupedExperts(_Experts):
    def forward(self, batch: RowBatch, out: torch.Tensor) -> torch.Tensor:
        """Each expert's rows through ``up_t(down_t(·))``, in the batch's order (``out`` is unused:
        the dispatcher brings the rows back and adds them)."""
        if grouped_mm_fits(batch.rows, self.down, self.up):
            # One grouped product per projection, its group offsets on the device: no host sync and
            # no launch per expert (an expert with no rows is an empty group: zero gradient).
            offsets = torch.cumsum(batch.count_tensor, 0).to(torch.int32)
            down = self.down.transpose(1, 2).to(batch.rows.dtype)
            h = grouped_mm(batch.rows, down, offs=offsets)
            if self.contracts_n:
                h = self.hooks.sum_partial(h)
            h = self.hooks.into_sharded_up(h)
            return grouped_mm(h, self.up.transpose(1, 2).to(h.dtype), offs=offsets)
        # Unbind once: indexing the stacked parameter per expert would make each expert's backward
        # zero-fill a full-size gradient (quadratic in E); unbind's backward stacks them once.
        downs, ups = self.down.unbind(0), self.up.unbind(0)
        return torch.cat([self.project_down(downs[t], chunk) @ ups[t].t().to(chunk.dtype)
                          for t, chunk in enumerate(batch.rows.split(batch.counts))])
