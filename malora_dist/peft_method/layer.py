"""The tuner layer: a frozen ``nn.Linear`` plus, per PEFT adapter name, the package's adapter layer.

The update is ``AdapterLinear``'s own (the layer training uses, in its one-process reference
form), built around ``ZeroBase`` so that it adds only the adapter's part: the tuner layer computes
``W0 x`` with its ``base_layer``, which PEFT needs to find, disable and unload.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

from malora_dist.adapters.file_format import ADAPTER_ATTR
from malora_dist.adapters.layer_class import adapter_linear
from malora_dist.config.adapter import AdapterConfig

MERGE_REFUSED = (
    "a mixture of LoRA experts cannot be merged into the base weights: each token's update goes through "
    "the experts its router picks, with gates computed from that token, so no single W0 + ΔW reproduces it. "
    "Use the PeftModel as it is (forward and generate work), or unload() for the base model"
)


class ZeroBase(nn.Module):
    """Stands in for the frozen linear inside ``AdapterLinear``: zeros of the output's shape."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class MaloraDistLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = (ADAPTER_ATTR,)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: AdapterConfig, name: str):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        setattr(self, ADAPTER_ATTR, nn.ModuleDict())
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, name)

    @property
    def adapter_modules(self) -> nn.ModuleDict:
        """The adapter layers by PEFT adapter name."""
        return getattr(self, ADAPTER_ATTR)

    def update_layer(self, adapter_name: str, config: AdapterConfig, name: str) -> None:
        """Add an adapter; ``name`` (the linear's name in the model) seeds its initial values as
        ``inject_adapters`` would."""
        # the reference kernel: the fused one computes W0 x inside its Function, and here the tuner layer owns W0
        self.adapter_modules[adapter_name] = adapter_linear(ZeroBase(self.in_features, self.out_features),
                                                            dataclasses.replace(config, kernel="reference"), name=name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """To the base's device, not its dtype: the adapter keeps fp32 parameters on any base, as in
        training (its products run in the activations' dtype). Meta parameters (PEFT's
        ``low_cpu_mem_usage``) wait for the loaded tensors."""
        adapter = self.adapter_modules[adapter_name] if adapter_name in self.adapter_modules else None
        weight = self.base_layer.weight
        if adapter is None or weight.is_meta or any(p.is_meta for p in adapter.parameters()):
            return
        adapter.to(device if device is not None else weight.device)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.adapter_modules:
                result = result + self.adapter_modules[name](x).to(result.dtype)
        return result

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        """The parts an adapter keeps at their initial values (``adapter.freeze``, HydraLoRA's identity
        P_t) stay frozen whatever PEFT marks trainable."""
        if adapter_names is None:
            adapter_names = list(self.adapter_modules)
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        for name in names:
            if name in self.adapter_modules:
                adapter = self.adapter_modules[name]
                for part, param in adapter.adapter_tensors():
                    if part in adapter.config.frozen_parts:
                        param.requires_grad_(False)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def __repr__(self) -> str:
        return "malora_dist." + super().__repr__()
