"""Apply the parallel layout to a model whose adapters were built full (the same on every rank).

Order: the base model is tensor-parallel already (``malora_dist.models``) and the adapters were
injected with full tensors from the same seed on every rank; this step keeps each rank's slice of
every adapter tensor (experts by EP rank, tp-sharded dims by tp rank) and connects the layers to
their process groups. The result reproduces the single-process model (DESIGN.md §3).
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from ..adapters.inject import adapter_layers
from .expert_exchange import AllToAllExchange
from .groups import ParallelGroups
from .placement import PLACEMENTS, LinkModel, placement_costs
from .sharding import local_slice


def parallelize_adapters(model: nn.Module, groups: ParallelGroups, placement: str = "ep",
                         tokens_per_rank: Optional[int] = None, link: Optional[LinkModel] = None,
                         micro_batches: int = 1) -> dict:
    """Shard and connect every adapter layer; return {layer name: "ep" | "replicate"}.

    placement: ``ep`` splits experts across the EP group, ``replicate`` keeps all experts on every
    rank (no token exchange), ``auto`` picks per layer from the cost model of
    ``malora_dist.parallel.placement`` (needs ``tokens_per_rank`` per step, the step's
    ``micro_batches`` and a measured ``link``).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"parallel.expert_placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "auto" and groups.ep > 1 and (tokens_per_rank is None or link is None):
        raise ValueError("expert_placement auto needs tokens_per_rank and a measured link")
    decisions = {}
    for name, layer in adapter_layers(model):
        moe = layer.config.is_moe
        if moe and layer.num_experts % groups.ep:
            raise ValueError(f"parallel.ep={groups.ep} must divide adapter.num_experts={layer.num_experts}")
        choice = placement
        if placement == "auto":
            choice = placement_costs(layer, tokens_per_rank, groups.dp, groups.ep, link,
                                     micro_batches=micro_batches).choice if groups.ep > 1 else "ep"
        split = moe and groups.ep > 1 and choice == "ep"
        for pname, param in layer.named_parameters():
            if not pname.startswith("base_layer."):
                param.malora_ep_sharded = split and getattr(param, "malora_expert", False)
                param.data = local_slice(param.data, param, groups)
        layer.dp_group = groups.dp_group
        if split:
            local = layer.num_experts // groups.ep
            layer.exchange = AllToAllExchange(groups.ep_group, groups.ep, groups.ep_rank, local)
            layer.expert_offset = groups.ep_rank * local
        if moe:
            decisions[name] = "ep" if split else "replicate"
    return decisions
