"""Save and load adapters as ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensors are always full (gathered over tp and ep) and experts are stored under their global index,
so a file does not depend on the layout that wrote it. A ``lora`` adapter is written in PEFT's format,
so ``peft.PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..config_utils import load_json
from ..parallel.groups import ParallelGroups
from ..parallel.sharding import full_tensor, local_slice
from .config import AdapterConfig
from .inject import adapter_layers, inject_adapters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "malora_dist"


def _file_keys(prefix: str, suffix: str, num_experts: int, method: str) -> list[str]:
    """File keys of one full tensor: one per expert for MoE experts (in global order), PEFT's names for LoRA."""
    if suffix == "magnitude":  # DoRA: PEFT's key (lora only)
        return [f"base_model.model.{prefix}.lora_magnitude_vector"]
    if not _is_stacked(suffix):
        return [f"{prefix}.{suffix}"]
    if method == "lora":
        return [f"base_model.model.{prefix}.{'lora_A' if suffix == 'expert_down' else 'lora_B'}.weight"]
    return [f"{prefix}.experts.{t}.{suffix.split('_')[1]}" for t in range(num_experts)]


def _is_stacked(suffix: str) -> bool:
    return suffix in ("expert_down", "expert_up", "expert_subspace")


def adapter_state(model: nn.Module, groups: Optional[ParallelGroups] = None) -> dict:
    """All adapter tensors, full and keyed by global names (a collective when sharded)."""
    groups = groups or ParallelGroups.single()
    state = {}
    for name, layer in adapter_layers(model):
        for suffix, param in layer.adapter_tensors():
            full = full_tensor(param, groups).cpu().clone()  # a snapshot, never a view of the live parameter
            keys = _file_keys(name, suffix, layer.num_experts, layer.method)
            state.update(zip(keys, full.unbind(0) if _is_stacked(suffix) else [full]))
    return state


def save_adapter(model: nn.Module, directory: str, config: AdapterConfig, groups: Optional[ParallelGroups] = None,
                 base_model_name_or_path: str = "") -> None:
    """Write the adapter (rank 0 writes; every rank must call this, it gathers shards)."""
    state = adapter_state(model, groups)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    tmp_weights = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_weights, metadata={"format": "pt"})
    tmp_config = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp_config, "w") as f:
        json.dump(_config_json(config, base_model_name_or_path), f, indent=2)
    os.replace(tmp_weights, os.path.join(directory, WEIGHTS_NAME))
    os.replace(tmp_config, os.path.join(directory, CONFIG_NAME))


def _config_json(config: AdapterConfig, base_model_name_or_path: str) -> dict:
    if config.method == "lora":
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": config.rank,
            "lora_alpha": config.scaling * config.rank,
            "lora_dropout": config.dropout,
            "target_modules": config.target_modules,
            "bias": "none",
            "use_dora": config.dora,
            "base_model_name_or_path": base_model_name_or_path,
        }
    return {"format": FORMAT, "base_model_name_or_path": base_model_name_or_path, "malora_dist": config.to_dict()}


def read_adapter_config(directory: str) -> AdapterConfig:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} holds no {CONFIG_NAME}: is it an adapter directory written by malora_dist?")
    data = load_json(path, "adapter config")
    if not isinstance(data, dict):
        raise ValueError(f"adapter config {path!r} must hold a JSON object")
    if data.get("peft_type") == "LORA":  # PEFT's own keys, so that PEFT reads the file without warnings
        return AdapterConfig(method="lora", rank=data["r"], alpha=data["lora_alpha"], dora=data.get("use_dora", False),
                             dropout=data.get("lora_dropout", 0.0), target_modules=data["target_modules"])
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is neither a malora_dist adapter nor a PEFT LoRA adapter")
    return AdapterConfig.from_dict(data["malora_dist"])


def load_adapter(model: nn.Module, directory: str, groups: Optional[ParallelGroups] = None) -> nn.Module:
    """Inject the saved adapter into ``model`` (or fill adapters already there) and load its tensors."""
    groups = groups or ParallelGroups.single()
    config = read_adapter_config(directory)
    if not any(True for _ in adapter_layers(model)):
        inject_adapters(model, config)
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    load_adapter_state(model, state, groups, source=directory)
    return model


def load_adapter_state(model: nn.Module, state: dict, groups: ParallelGroups, source: str = "state") -> None:
    """Copy full, globally keyed tensors into the (possibly sharded) adapter parameters."""
    expected = set()
    for name, layer in adapter_layers(model):
        for suffix, param in layer.adapter_tensors():
            keys = _file_keys(name, suffix, layer.num_experts, layer.method)
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"{source} lacks {missing[:3]}{' …' if len(missing) > 3 else ''}: "
                                 f"it does not match this model's adapter layout")
            full = torch.stack([state[k] for k in keys]) if _is_stacked(suffix) else state[keys[0]]
            part = local_slice(full, param, groups)
            if part.shape != param.shape:
                raise ValueError(f"{source}: {name}.{suffix} has shape {tuple(full.shape)}, which does not fit "
                                 f"a local parameter of shape {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(part)
            expected.update(keys)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{source} holds tensors this model has no adapter for: {unexpected[:3]}")
