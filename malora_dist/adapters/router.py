"""The router part: fp32 logits → top-k experts and gates, and the statistics for the router losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from malora_dist.adapters.gating import RouterStatistics, router_statistics, top_k_gates
from malora_dist.adapters.tensor_parallel import TensorParallelHooks


@dataclass
class Routing:
    """Per token: the chosen experts (T, k) by global index and their gates (T, k), already
    multiplied by the adapter's scaling (the smallest tensor that can carry it)."""

    experts: torch.Tensor
    gates: torch.Tensor
    counts: Optional[torch.Tensor] = None  # (N,) slots per expert, as the router statistics counted them


class TopKRouter(nn.Module):
    """``p = softmax(W_g x)`` in fp32 (fp64 stays fp64), keep the top-k. ``weight`` (N, n): an
    ``nn.Linear`` without bias, fed x before dropout; sharded on n under a row-parallel base (its
    logits are then partial sums, which the projection step all-reduces)."""

    def __init__(self, weight: torch.Tensor, top_k: int, normalize: bool, z_loss: bool, scaling: float,
                 hooks: TensorParallelHooks, slice_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.top_k = top_k
        self.normalize = normalize
        self.z_loss = z_loss
        self.scaling = scaling
        self.hooks = hooks
        self.slice_group = slice_group  # see RouterStatistics
        # The last forward's routing sums (turned into losses by ``inject.auxiliary_loss``).
        self.stats: Optional[RouterStatistics] = None

    def forward(self, logits: torch.Tensor) -> Routing:
        probs, gates, experts = top_k_gates(logits, self.top_k, self.normalize)
        self.stats = router_statistics(probs, logits, experts, self.z_loss, self.slice_group)
        return Routing(experts, self.scaling * self.hooks.into_sharded_up(gates), self.stats.slot_counts)

    def record(self, slot_counts: torch.Tensor, tokens: int, prob_sums: torch.Tensor,
               z_sum: Optional[torch.Tensor]) -> None:
        """Keep the routing sums of a forward that routed for this router (the fused Functions,
        which compute logits, gates and these sums in one pass): (N,) slots per expert, the tokens
        routed, (N,) probability sums and Σ logsumexp² (read only with a z-loss)."""
        self.stats = RouterStatistics(slot_counts, tokens, prob_sums, z_sum if self.z_loss else None, self.top_k,
                                      self.slice_group)

    def clear(self) -> None:
        """Forget the last forward's sums once the router losses are formed from them."""
        self.stats = None

    def extra_repr(self) -> str:
        return f"experts={self.weight.shape[0]}, top_k={self.top_k}"


class SingleExpert:
    """LoRA's trivial router: every token to its one expert; the scaling goes on the experts' h."""

    stats = None

    def __call__(self, logits: None) -> None:
        return None
