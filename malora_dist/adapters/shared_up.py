"""MALoRA mirrored (``adapter.shared_side: up``, Table 3's "shared subspace on B"): one shared
up-projection ``S_B`` (m×d) after the experts.

Because ``S_B`` is linear and shared, ``Σ_t g_t S_B P_t Ā_t x = S_B Σ_t g_t P_t Ā_t x``: the experts
return d numbers per slot (instead of m), the dispatcher combines them into one d-vector per token,
and ``S_B`` applies once per token — the shared part, mirrored from ``S_A x`` before routing.

Tensor parallelism: under a column-parallel base ``S_B`` is sharded on m and the combined d-vector
is the one rank-space tensor that enters a sharded matrix, so it alone passes through
``copy_to_tensor_model_parallel_region`` (which sums every partial gradient upstream: P_t, Ā_t, the
gates, x); under a row-parallel base ``S_B`` is replicated and added after the base's all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from malora_dist.adapters.accumulate import add_product
from malora_dist.adapters.tensor_parallel import TensorParallelHooks


class SharedUpProjection(nn.Module):
    def __init__(self, weight: torch.Tensor, hooks: TensorParallelHooks):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (m, d), this rank's rows under a column-parallel base
        self.hooks = hooks

    def forward(self, combined: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + S_B · combined``; ``combined`` (T, d) is the experts' gated, scaled sum."""
        return add_product(out, self.hooks.into_sharded_up(combined).to(out.dtype), self.weight.t().to(out.dtype))
