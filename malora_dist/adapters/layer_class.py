"""Which class builds an adapted linear: the one that runs its variant's forward kind."""

from __future__ import annotations

import torch.nn as nn

from malora_dist.adapters.dora import DoraLinear
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.layout import SINGLE_PROCESS, AdapterLayout
from malora_dist.adapters.variant import DORA, PLAIN, SHARED_UP, forward_kind
from malora_dist.config.adapter import AdapterConfig

LAYER_CLASSES = {PLAIN: AdapterLinear, SHARED_UP: AdapterLinear, DORA: DoraLinear}


def adapter_linear(base_layer: nn.Module, config: AdapterConfig, name: str = "",
                   layout: AdapterLayout = SINGLE_PROCESS, seed: int = 0) -> AdapterLinear:
    """The adapted linear around ``base_layer`` of ``config``'s variant (``AdapterLinear``'s arguments)."""
    return LAYER_CLASSES[forward_kind(config)](base_layer, config, name=name, layout=layout, seed=seed)
