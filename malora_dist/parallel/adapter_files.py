"""Save and load adapters as ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensors are always full (gathered over tp and ep), so a file does not depend on the layout that
wrote it. Files are written in PEFT's forms (``file_format``): a ``lora`` adapter as PEFT's LoRA,
a mixture (molora, malora, hydralora) as the ``malora_dist`` PEFT method, experts stacked in global
order. Checkpoints keep their own keys (``adapter_state``'s default: one tensor per expert by
global index), which the older adapter files also use; both still load.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from malora_dist.adapters.file_format import (
    CONFIG_NAME,
    LORA_PART_KEYS,
    PEFT_MODEL_PREFIX,
    WEIGHTS_NAME,
    adapter_config_from_json,
    config_json,
    is_peft_mixture,
    mixture_file_key,
    split_mixture_file_key,
)
from malora_dist.adapters.inject import adapter_layers, inject_adapters
from malora_dist.adapters.variant import PER_EXPERT_PARTS, Part
from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.loading import load_json
from malora_dist.parallel.sharding import full_tensor, local_slice
from malora_dist.runtime.groups import ParallelGroups


def checkpoint_keys(prefix: str, part: str, num_experts: int, method: str) -> list[str]:
    """Checkpoint keys of one part's full tensor: PEFT's names for method lora, one key per expert
    (in global order) for a mixture's per-expert part, else the layer's name and the part's."""
    if method == "lora":
        return [f"{PEFT_MODEL_PREFIX}{prefix}.{LORA_PART_KEYS[part]}"]
    if part in PER_EXPERT_PARTS:
        return [f"{prefix}.experts.{t}.{part.split('_')[1]}" for t in range(num_experts)]
    return [f"{prefix}.{part}"]


def _tensor_keys(name: str, layer: nn.Module, part: Part, peft_form: bool) -> tuple[list, bool]:
    """The keys of one part's tensor and whether the full tensor is split over them on dim 0 (its
    experts, one key each).

    ``peft_form``: the file keys of the PEFT mixture method (one full tensor, named as the
    parameter is named in the layer); LoRA's checkpoint keys are already PEFT's."""
    if peft_form and layer.method != "lora":
        return [mixture_file_key(name, part.name)], False
    return checkpoint_keys(name, part.name, layer.num_experts, layer.method), part.per_expert


def adapter_state(model: nn.Module, groups: Optional[ParallelGroups] = None, peft_form: bool = False) -> dict:
    """All adapter tensors, full and keyed by global names (a collective when sharded): checkpoint
    keys, or with ``peft_form`` the keys of the adapter file."""
    groups = groups or ParallelGroups.single()
    state = {}
    for name, layer in adapter_layers(model):
        for part, (_, param) in zip(layer.variant.parts, layer.adapter_tensors()):
            full = full_tensor(param, groups).cpu().clone()  # a snapshot, never a view of the live parameter
            keys, split = _tensor_keys(name, layer, part, peft_form)
            state.update(zip(keys, full.unbind(0) if split else [full]))
    return state


def save_adapter(model: nn.Module, directory: str, config: AdapterConfig, groups: Optional[ParallelGroups] = None,
                 base_model_name_or_path: str = "") -> None:
    """Write the adapter (rank 0 writes; every rank must call this, it gathers shards)."""
    state = adapter_state(model, groups, peft_form=True)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(directory, exist_ok=True)
    tmp_weights = os.path.join(directory, WEIGHTS_NAME + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_weights, metadata={"format": "pt"})
    tmp_config = os.path.join(directory, CONFIG_NAME + ".tmp")
    with open(tmp_config, "w") as f:
        json.dump(config_json(config, base_model_name_or_path), f, indent=2)
    os.replace(tmp_weights, os.path.join(directory, WEIGHTS_NAME))
    os.replace(tmp_config, os.path.join(directory, CONFIG_NAME))


def _read_config_json(directory: str) -> tuple[dict, str]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{directory!r} holds no {CONFIG_NAME}: is it an adapter directory written by malora_dist?")
    data = load_json(path, "adapter config")
    if not isinstance(data, dict):
        raise ValueError(f"adapter config {path!r} must hold a JSON object")
    return data, path


def read_adapter_config(directory: str) -> AdapterConfig:
    data, path = _read_config_json(directory)
    return adapter_config_from_json(data, path)


def read_adapter_state(directory: str) -> tuple[dict, AdapterConfig]:
    """(tensors under checkpoint keys, config) of an adapter directory of any form, without a model."""
    data, path = _read_config_json(directory)
    config = adapter_config_from_json(data, path)
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    if not is_peft_mixture(data):
        return state, config
    converted = {}
    for key, value in state.items():
        layer_name, part = split_mixture_file_key(key)
        keys = checkpoint_keys(layer_name, part, config.num_experts, config.method)
        converted.update(zip(keys, value.unbind(0) if part in PER_EXPERT_PARTS else [value]))
    return converted, config


def load_adapter(model: nn.Module, directory: str, groups: Optional[ParallelGroups] = None) -> nn.Module:
    """Inject the saved adapter into ``model`` (or fill adapters already there) and load its tensors."""
    groups = groups or ParallelGroups.single()
    data, path = _read_config_json(directory)
    config = adapter_config_from_json(data, path)
    if not any(True for _ in adapter_layers(model)):
        inject_adapters(model, config)
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    load_adapter_state(model, state, groups, source=directory, peft_form=is_peft_mixture(data))
    return model


def load_adapter_state(model: nn.Module, state: dict, groups: ParallelGroups, source: str = "state",
                       peft_form: bool = False) -> None:
    """Copy full, globally keyed tensors (``adapter_state``'s keys) into the (possibly sharded)
    adapter parameters."""
    expected = set()
    for name, layer in adapter_layers(model):
        for part, (_, param) in zip(layer.variant.parts, layer.adapter_tensors()):
            keys, split = _tensor_keys(name, layer, part, peft_form)
            missing = [k for k in keys if k not in state]
            if missing:
                raise ValueError(f"{source} lacks {missing[:3]}{' …' if len(missing) > 3 else ''}: "
                                 f"it does not match this model's adapter layout")
            full = torch.stack([state[k] for k in keys]) if split else state[keys[0]]
            if tuple(full.shape) != part.shape:
                raise ValueError(f"{source}: {name}.{part.name} has shape {tuple(full.shape)}, where this model's "
                                 f"{layer.method} adapter holds {part.shape}")
            with torch.no_grad():
                param.copy_(local_slice(full, param, groups))
            expected.update(keys)
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{source} holds tensors this model has no adapter for: {unexpected[:3]}")
