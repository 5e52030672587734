"""The tuner model: puts a ``MaloraDistLayer`` in place of each targeted ``nn.Linear``."""

from __future__ import annotations

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner

from malora_dist.adapters.file_format import ADAPTER_ATTR, PEFT_PREFIX
from malora_dist.peft_method.layer import MERGE_REFUSED, MaloraDistLayer


class MaloraDistModel(BaseTuner):
    prefix: str = PEFT_PREFIX
    tuner_layer_cls = MaloraDistLayer
    target_module_mapping: dict = {}  # never consulted: the config always names its target_modules

    def _create_and_replace(self, peft_config, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, parameter_name=None) -> None:
        config = peft_config.adapter_config()
        if isinstance(target, MaloraDistLayer):
            target.update_layer(adapter_name, config, current_key)
            return
        if not isinstance(target, nn.Linear) or not target.weight.dtype.is_floating_point:
            raise ValueError(f"{current_key} is a {type(target).__name__}: the malora_dist PEFT method adapts "
                             f"torch.nn.Linear layers with floating-point weights, as training does; quantized "
                             f"and other layer types are not supported")
        new_module = MaloraDistLayer(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is set active
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self) -> None:
        raise ValueError(MERGE_REFUSED)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``<linear>.malora_dist_adapter.<name>.<part>`` → ``<linear>.malora_dist_adapter.<part>``
        (the adapter name sits before the part's own dotted path, not second to last)."""
        return key.replace(f".{ADAPTER_ATTR}.{adapter_name}.", f".{ADAPTER_ATTR}.", 1)
