"""Experts with subspaces of their own: Table 3's "no shared S_A" ablation of MALoRA
(``adapter.subspace: per_expert``). Expert t computes ``B̄_t P_t S_t x`` with its own ``S_t`` (d×n)
instead of the shared ``S_A``, so x itself travels to the experts (n numbers per slot, as MoLoRA's).

``subspace`` (E, d, n) is stacked like ``down`` and ``up`` (local experts, sharded on n under a
row-parallel base, where ``S_t x`` is a partial sum reduced over tp before ``P_t``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from malora_dist.adapters.dispatch import RowBatch
from malora_dist.adapters.experts import DenseExperts, GroupedExperts


class DenseSubspaceExperts(DenseExperts):
    def __init__(self, down, up, subspace, hooks, scaling: float):
        super().__init__(down, up, False, hooks, scaling)
        self.subspace = nn.Parameter(subspace)

    def project_down(self, down: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Every local expert's ``P_t S_t rows`` as (T, E·r̄) (``down`` is the stacked P_t)."""
        num, rank, width = self.down.shape
        z = self.hooks.sum_partial(rows @ self.subspace.reshape(num * width, -1).t().to(rows.dtype))
        h = torch.einsum("ted,erd->ter", z.view(-1, num, width), down.view(num, rank, width).to(rows.dtype))
        return self.hooks.into_sharded_up(h.reshape(-1, num * rank))


class GroupedSubspaceExperts(GroupedExperts):
    def __init__(self, down, up, subspace, hooks):
        super().__init__(down, up, False, hooks)
        self.subspace = nn.Parameter(subspace)

    def forward(self, batch: RowBatch, out: torch.Tensor) -> torch.Tensor:
        downs, ups, subspaces = self.down.unbind(0), self.up.unbind(0), self.subspace.unbind(0)
        results = []
        for t, chunk in enumerate(batch.rows.split(batch.counts)):
            z = self.hooks.sum_partial(chunk @ subspaces[t].t().to(chunk.dtype))
            h = self.hooks.into_sharded_up(z @ downs[t].t().to(chunk.dtype))
            results.append(h @ ups[t].t().to(chunk.dtype))
        return torch.cat(results)
