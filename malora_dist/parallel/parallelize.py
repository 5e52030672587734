"""Apply the parallel layout to a model whose adapters were built full (the same on every rank).

Order: the base model is tensor-parallel already (``malora_dist.models``) and the adapters were
injected with full tensors from the same seed on every rank; this step keeps each rank's slice of
every adapter tensor (experts by EP rank, tp-sharded dims by tp rank) and connects the layers to
their process groups. The result reproduces the single-process model (DESIGN.md §3).
"""

from __future__ import annotations

import torch.nn as nn

from ..adapters.inject import adapter_layers
from .expert_exchange import AllToAllExchange
from .groups import ParallelGroups
from .sharding import local_slice


def parallelize_adapters(model: nn.Module, groups: ParallelGroups) -> nn.Module:
    for name, layer in adapter_layers(model):
        if layer.config.is_moe and layer.num_experts % groups.ep:
            raise ValueError(f"parallel.ep={groups.ep} must divide adapter.num_experts={layer.num_experts}")
        for pname, param in layer.named_parameters():
            if not pname.startswith("base_layer."):
                param.data = local_slice(param.data, param, groups)
        layer.dp_group = groups.dp_group
        if layer.config.is_moe and groups.ep > 1:
            local = layer.num_experts // groups.ep
            layer.exchange = AllToAllExchange(groups.ep_group, groups.ep, groups.ep_rank, local)
            layer.expert_offset = groups.ep_rank * local
    return model
