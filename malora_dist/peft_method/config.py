"""The PEFT config of the mixture method: PEFT's fields plus exactly the adapter config's keys.

Its fields are made from ``AdapterConfig``'s, with the same names and defaults, so that the file a
training run writes and the one ``PeftModel.save_pretrained`` writes hold the same keys, and a key
added to the adapter config is a PEFT field too.
"""

from __future__ import annotations

import dataclasses

from peft import PeftConfig

from malora_dist.config.adapter import AdapterConfig
from malora_dist.peft_method.peft_type import mixture_peft_type


def _adapter_fields() -> list:
    fields = []
    for f in dataclasses.fields(AdapterConfig):
        if f.default is not dataclasses.MISSING:
            default = dataclasses.field(default=f.default)
        else:
            default = dataclasses.field(default_factory=f.default_factory)
        fields.append((f.name, f.type, default))
    return fields


def _post_init(self) -> None:
    PeftConfig.__post_init__(self)
    self.peft_type = mixture_peft_type()
    self.adapter_config()  # a bad key is refused here, with the adapter config's message


def adapter_config(self) -> AdapterConfig:
    """The package's adapter config of these keys (validated)."""
    config = AdapterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterConfig)})
    if not config.is_moe:
        raise ValueError("method lora is PEFT's own LoRA method: load LoRA adapters with peft's LoraConfig "
                         "(malora_dist writes them in that form, peft_type LORA)")
    return config


MaloraDistConfig = dataclasses.make_dataclass(
    "MaloraDistConfig", _adapter_fields(), bases=(PeftConfig,),
    namespace={"__post_init__": _post_init, "adapter_config": adapter_config, "__module__": __name__,
               "__doc__": "A MoLoRA, MALoRA or HydraLoRA adapter of malora_dist as a PEFT config; the keys are "
                          "malora_dist.config.adapter.AdapterConfig's (method, rank, num_experts, top_k, ...)."},
)
