"""Export the adapter of any training checkpoint, whatever layout wrote it, as one adapter directory in
PEFT's form with its model card (``malora-export`` is the command)."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

from malora_dist.adapters.inject import adapter_layers, inject_adapters
from malora_dist.config.run import RunConfig
from malora_dist.export.model_card import write_model_card
from malora_dist.parallel.adapter_files import adapter_state, load_adapter_state, save_adapter
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.train.checkpoint import MARKER, META, fingerprint_changes
from malora_dist.train.preflight import model_hf_config

# Sections whose change makes the checkpoint's tensors not fit (data may differ freely).
SHAPE_SECTIONS = ("model.", "adapter.")


def run_hf_config(config: RunConfig):
    """The Hugging Face config of the run's base (read from its files where it has no inline config)."""


    return model_hf_config(config) or AutoConfig.from_pretrained(config.model.name_or_path)


def adapter_skeleton(config: RunConfig, hf_config=None) -> nn.Module:
    """The run's model with its adapters at full size on the CPU (zeros) and its base on the meta
    device, module names as in training (the tensor-parallel base mirrors Hugging Face's)."""

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config or run_hf_config(config))
    inject_adapters(model, config.adapter)  # on a meta base the adapters are built on meta too
    for _, layer in adapter_layers(model):
        for part_name, part in layer.named_modules():
            if part_name.startswith("base_layer"):
                continue
            for name, param in list(part.named_parameters(recurse=False)):
                value = nn.Parameter(torch.zeros(param.shape, dtype=param.dtype), requires_grad=False)
                value.__dict__.update(param.__dict__)  # the layout tags
                setattr(part, name, value)
    return model


def check_checkpoint(config: RunConfig, checkpoint: str) -> int:
    """Refuse a checkpoint that is incomplete or of another shape than ``config``; return its step."""
    meta_path = os.path.join(checkpoint, META)
    if not os.path.exists(os.path.join(checkpoint, MARKER)) or not os.path.exists(meta_path):
        raise ValueError(f"--checkpoint {checkpoint!r} is not a complete checkpoint (no {MARKER} marker or {META}): "
                         f"pass a step directory such as RUN/checkpoints/step_N")
    with open(meta_path) as f:
        meta = json.load(f)
    changed = [k for k in fingerprint_changes(meta["fingerprint"], config) if k.startswith(SHAPE_SECTIONS)]
    if changed:
        raise ValueError(f"--checkpoint {checkpoint!r} was written with other values of {changed} than --config "
                         f"has: pass the run's own config (RUN/config.yaml)")
    return meta["step"]


def export_checkpoint(config: RunConfig, checkpoint: str, out: str, config_path: Optional[str] = None,
                      command: Optional[str] = None) -> str:
    """Write the adapter of ``checkpoint`` (a ``step_N`` directory of this run) and its model card to
    ``out``. ``config_path`` (the run config's file) and ``command`` (the export command line) go
    into the card."""
    step = check_checkpoint(config, checkpoint)
    hf_config = run_hf_config(config)
    model = adapter_skeleton(config, hf_config)
    state = adapter_state(model)  # the file keys and full shapes, filled in place below
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=checkpoint, no_dist=True)
    load_adapter_state(model, state, ParallelGroups.single(), source=checkpoint)
    save_adapter(model, out, config.adapter,
                 base_model_name_or_path=config.model.name_or_path or config.model.gguf_file or "")
    write_model_card(out, config, hf_config, step, run_directory(checkpoint), config_path, command)
    return out


def run_directory(checkpoint: str) -> Optional[str]:
    """``RUN`` of ``RUN/checkpoints/step_N``; None for a checkpoint kept elsewhere."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


