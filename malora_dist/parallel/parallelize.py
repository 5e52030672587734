"""Build a model's adapters for its parallel layout (model code holds no parallelism:
docs/ARCHITECTURE.md §12 (house rules)).

Order: the base is tensor-parallel already (``malora_dist.models``); this step decides where each
MoE layer's experts live (``ep``, ``replicate`` or ``auto`` from the cost model of
``malora_dist.parallel.placement``) and injects every adapter built for its layout: a rank
allocates only its own experts, with the values a full build gives them, and its slices of
tensor-parallel tensors. The result reproduces the single-process model (docs/ARCHITECTURE.md §7
(correctness)).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from malora_dist.adapters.inject import inject_adapters
from malora_dist.adapters.layout import AdapterLayout
from malora_dist.adapters.siblings import exchange_members
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.placement import PLACEMENTS, LinkModel, placement_costs
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.log import get_logger


def build_adapters(model: nn.Module, config: AdapterConfig, groups: ParallelGroups, placement: str = "ep",
                   seed: int = 0, tokens_per_rank: Optional[int] = None, link: Optional[LinkModel] = None,
                   micro_batches: int = 1, dtype: torch.dtype = torch.float32, share_exchanges: bool = True) -> dict:
    """Inject ``config``'s adapters into ``model`` for ``groups``; return {MoE layer name: "ep" | "replicate"}.

    placement: ``ep`` splits experts across the EP group, ``replicate`` keeps all experts on every
    rank (no token exchange), ``auto`` picks per layer (needs ``tokens_per_rank`` per step, the
    step's ``micro_batches``, a measured ``link`` and the activations' ``dtype``).
    share_exchanges: layers that read the same input share one exchange (``inject_adapters``).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"parallel.expert_placement must be one of {PLACEMENTS}, got {placement!r}")
    if config.is_moe and config.num_experts % groups.ep:
        raise ValueError(f"parallel.ep={groups.ep} must divide adapter.num_experts={config.num_experts}")
    if placement == "auto" and config.is_moe and groups.ep > 1 and (tokens_per_rank is None or link is None):
        raise ValueError("expert_placement auto needs tokens_per_rank and a measured link")
    decisions: dict = {}

    def layout_for(name: str, base: nn.Module) -> AdapterLayout:
        choice = "replicate" if not config.is_moe or groups.ep == 1 else placement
        if choice == "auto":
            members = exchange_members(name, config.target_modules) if share_exchanges else 1
            choice = placement_costs(config, base.in_features, base.out_features, tokens_per_rank, groups.dp,
                                     groups.ep, link, micro_batches, dtype, members).choice
        if config.is_moe:
            decisions[name] = "ep" if choice == "ep" else "replicate"
        if choice == "ep":
            return AdapterLayout(ep_group=groups.ep_group, ep_size=groups.ep, ep_rank=groups.ep_rank)
        return AdapterLayout()

    inject_adapters(model, config, seed=seed, layout_for=layout_for, share_exchanges=share_exchanges)
    for note in config.ineffective_keys(experts_split="ep" in decisions.values()):
        get_logger().info("%s", note)
    return decisions
