"""What an adapter directory's ``adapter_config.json`` says and what its tensors are called.

Three forms, all read by ``malora_dist.parallel.adapter_files``:

- PEFT's LoRA (``peft_type: LORA``), written for method ``lora``: PEFT's own LoRA loads it;
- the PEFT mixture method (``peft_type: MALORA_DIST``), written for molora, malora and hydralora:
  the adapter's keys beside PEFT's, and one full tensor per part of each adapted linear, experts
  stacked on dim 0 in global order, named as the parameters of ``malora_dist.peft_method``'s tuner
  layer (``base_model.model.<linear>.malora_dist_adapter.<part>``), so ``PeftModel.from_pretrained``
  loads it once that method is registered;
- the older malora_dist form (``format: malora_dist``, one tensor per expert), still read.

This module imports neither peft nor torch: training and export write the PEFT forms without
loading PEFT.
"""

from __future__ import annotations

from malora_dist.adapters.variant import PART_PATHS
from malora_dist.config.adapter import AdapterConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_FORMAT = "malora_dist"

# The method registered with PEFT: its name, PeftType, and the prefix of its layer attributes
# (PEFT finds an adapter's tensors and reports missing ones by that prefix).
PEFT_METHOD = "malora_dist"
PEFT_TYPE = PEFT_METHOD.upper()
PEFT_PREFIX = PEFT_METHOD + "_"
# The tuner layer's ModuleDict of adapter layers, keyed by PEFT adapter name.
ADAPTER_ATTR = PEFT_PREFIX + "adapter"
# What PeftModel puts before the base model's module names in its state dict and files.
PEFT_MODEL_PREFIX = "base_model.model."
TASK_TYPE = "CAUSAL_LM"


# A mixture's file key names a part by its parameter's path in the layer (variant.py's PART_PATHS),
# as PEFT's state dict does; a part is read back from that path.
PATH_PARTS = {path: part for part, path in PART_PATHS.items()}
# PEFT's LoRA names the parts of method lora (A, B and DoRA's magnitude) after the adapted linear.
LORA_PART_KEYS = {"expert_down": "lora_A.weight", "expert_up": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def mixture_file_key(layer_name: str, part: str) -> str:
    """The file key of one part (``expert_down``, ``router.weight``, ...) of an adapted linear."""
    return f"{PEFT_MODEL_PREFIX}{layer_name}.{ADAPTER_ATTR}.{PART_PATHS[part]}"


def split_mixture_file_key(key: str) -> tuple[str, str]:
    """(the adapted linear's name, the part) of a file key of the mixture method."""
    layer_name, found, path = key.removeprefix(PEFT_MODEL_PREFIX).partition(f".{ADAPTER_ATTR}.")
    if not found or path not in PATH_PARTS:
        raise ValueError(f"{key!r} is not a tensor of the {PEFT_TYPE} method (<linear>.{ADAPTER_ATTR}.<part>, "
                         f"part one of {sorted(PATH_PARTS)})")
    return layer_name, PATH_PARTS[path]


def config_json(config: AdapterConfig, base_model_name_or_path: str) -> dict:
    """``adapter_config.json`` in the PEFT form of the method."""
    if config.method == "lora":
        return {
            "peft_type": "LORA",
            "task_type": TASK_TYPE,
            "r": config.rank,
            "lora_alpha": config.scaling * config.rank,
            "lora_dropout": config.dropout,
            "target_modules": config.target_modules,
            "bias": "none",
            "use_dora": config.dora,
            "base_model_name_or_path": base_model_name_or_path,
        }
    # PEFT's own keys, then the adapter's: the PEFT config class has exactly these fields
    return {"peft_type": PEFT_TYPE, "task_type": TASK_TYPE, "base_model_name_or_path": base_model_name_or_path,
            **config.to_dict()}


def is_peft_mixture(data: dict) -> bool:
    return data.get("peft_type") == PEFT_TYPE


def adapter_config_from_json(data: dict, path: str) -> AdapterConfig:
    """The adapter config of any of the three forms; ``path`` names the file in errors."""
    if data.get("peft_type") == "LORA":  # PEFT's own keys, so that PEFT reads the file without warnings
        return AdapterConfig(method="lora", rank=data["r"], alpha=data["lora_alpha"], dora=data.get("use_dora", False),
                             dropout=data.get("lora_dropout", 0.0), target_modules=data["target_modules"])
    if is_peft_mixture(data):
        # PEFT's save_pretrained adds its own keys (peft_version, revision, ...): only the adapter's are read
        return AdapterConfig.from_dict({k: v for k, v in data.items() if k in AdapterConfig.__dataclass_fields__})
    if data.get("format") != LEGACY_FORMAT:
        raise ValueError(f"{path} is neither a malora_dist adapter nor a PEFT LoRA adapter "
                         f"(peft_type {data.get('peft_type')!r})")
    return AdapterConfig.from_dict(data["malora_dist"])
