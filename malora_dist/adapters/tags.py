"""Parameter tags, set when a parameter is created, so reduction and sharding never match on names.

- ``malora_expert``: the parameter belongs to routed experts (stacked on dim 0 by global expert
  index); its gradient is summed over the expert-data-parallel group, its dim 0 is split by ep.
- ``malora_tp_dim``: the dim split across tensor-parallel ranks, or None when replicated over tp.
- ``malora_ep_sharded``: set when the layer is built for its layout, on expert tensors split across
  the EP group (placement ``ep``); experts replicated on every rank (placement ``replicate``, or a
  single process) are reduced over dp like any replicated parameter.
"""

from __future__ import annotations

from typing import Optional

import torch


def tag(param: torch.nn.Parameter, *, expert: bool, tp_dim: Optional[int] = None) -> torch.nn.Parameter:
    param.malora_expert = expert
    param.malora_tp_dim = tp_dim
    return param


def is_expert(param: torch.Tensor) -> bool:
    return getattr(param, "malora_expert", False)


def tp_dim(param: torch.Tensor) -> Optional[int]:
    return getattr(param, "malora_tp_dim", None)


def is_ep_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "malora_ep_sharded", False)
