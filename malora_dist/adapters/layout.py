"""Where one adapter layer's pieces live: given to the layer when it is built (docs/ARCHITECTURE.md
§3.3 (who owns which expert), §2 (layer parts)).

Tensor parallelism is the base layer's (its ``parallel_mode`` and ``tp_group``); this object adds
what only the run's layout knows: which ranks share the tokens of one micro-batch (for the router
losses), and whether the experts are split across an expert-parallel group (placement ``ep``) or
held whole by every rank (one process, or placement ``replicate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class AdapterLayout:
    """slice_group: the ranks that hold other tokens of this rank's micro-batches, over which the
    router losses' counts are all-reduced (``gating.RouterStatistics``). None for every layout
    today: dp and ep ranks hold whole sequences of their own, tp peers the same ones.
    ep_group, ep_size, ep_rank: the expert-parallel group that splits the experts, or
    (None, 1, 0) when every rank holds all experts."""

    slice_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    ep_size: int = 1
    ep_rank: int = 0

    @property
    def experts_split(self) -> bool:
        return self.ep_size > 1

    def local_experts(self, num_experts: int) -> range:
        """The global indices of the experts this rank owns: rank e owns [e·N/ep, (e+1)·N/ep)."""
        if num_experts % self.ep_size:
            raise ValueError(f"parallel.ep={self.ep_size} must divide adapter.num_experts={num_experts}")
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)


SINGLE_PROCESS = AdapterLayout()
