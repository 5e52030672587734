"""The tiny config's model as a plain Hugging Face model, and a random adapter for it (the
independent reference of the evaluation, generation and lm-eval tests)."""

import torch
from reference import randomize_adapter_
from training_support import TINY

from malora_dist.adapters.inject import adapter_layers, inject_adapters
from malora_dist.config.run import load_run_config
from malora_dist.models import build_tiny_causal_lm
from malora_dist.parallel.adapter_files import load_adapter, save_adapter


def tiny(*overrides):
    return load_run_config(TINY, list(overrides))


def tiny_hf(adapter_dir=None):
    config = tiny()
    model = build_tiny_causal_lm(config.model.config, seed=config.train.seed)
    return load_adapter(model, adapter_dir) if adapter_dir else model


def write_random_adapter(directory, *overrides):
    """The tiny config's adapter (MALoRA unless ``overrides`` say otherwise) with random values
    everywhere (B̄ = 0 at init would hide it)."""
    config = tiny(*overrides)
    model = tiny_hf()
    inject_adapters(model, config.adapter)
    generator = torch.Generator().manual_seed(1)
    for _, layer in adapter_layers(model):
        randomize_adapter_(layer, generator)
    save_adapter(model, directory, config.adapter)
