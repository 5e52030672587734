"""The two tensor-parallel mappings of an adapter layer, chosen from its base (docs/ARCHITECTURE.md
§4 (tensor parallel)).

- ``row`` base (input sharded on n): every product that contracts n (router logits, ``S_A x``,
  MoLoRA's ``A_t x``) is a partial sum and is all-reduced over tp (``sum_partial``);
- ``column`` base (output sharded on m): the rank-space tensors that enter the sharded
  up-projection (``h`` and the gates) pass through ``copy_to_tensor_model_parallel_region`` exactly
  once (``into_sharded_up``), which sums their partial gradients; nothing else is reduced over tp.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region


class TensorParallelHooks:
    """``mode``: None (no tensor parallelism), ``column`` or ``row``; ``group``: the base's tp group."""

    def __init__(self, mode: Optional[str], group: Optional[dist.ProcessGroup]):
        if mode not in (None, "column", "row"):
            raise ValueError(f"unknown tensor-parallel mode {mode!r} of an adapted base layer")
        self.mode = mode if group is not None and dist.get_world_size(group) > 1 else None
        self.group = group
        self.size = dist.get_world_size(group) if self.mode else 1
        self.rank = dist.get_rank(group) if self.mode else 0

    def sum_partial(self, t: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_model_parallel_region(t, group=self.group) if self.mode == "row" else t

    def into_sharded_up(self, t: torch.Tensor) -> torch.Tensor:
        return copy_to_tensor_model_parallel_region(t, group=self.group) if self.mode == "column" else t

    def for_replicated_up(self) -> "TensorParallelHooks":
        """The hooks of the router and experts when the up-projection they feed is replicated over tp
        (``shared_side: up``'s P_t): under a column base the one copy belongs to the shared S_B after
        them (a copy on the gates too would count their gradient twice), so they do no tp mapping at
        all; under a row base the experts still sum their partial ``Ā_t x``."""
        return TensorParallelHooks(None, None) if self.mode == "column" else self

    def shard(self, full: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
        """This rank's part of a full tensor split on ``dim`` (None: replicated)."""
        if dim is None or self.size == 1:
            return full
        return full.chunk(self.size, dim=dim)[self.rank].contiguous()

    def input_features(self, local_width: int) -> range:
        """Global indices of the input features this rank holds (a row base's slice of n)."""
        start = self.rank * local_width if self.mode == "row" else 0
        return range(start, start + local_width)
