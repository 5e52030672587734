"""Parameter counts of an adapter config on a model config: the model is built on the meta device,
so a 70B config answers in seconds without allocating weights.

- ``trainable_percent`` = 100 × trainable / base;
- ``trainable_percent_of_all`` = 100 × trainable / (base + every adapter parameter, frozen ones
  included): PEFT's ``print_trainable_parameters`` count.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from malora_dist.adapters.inject import adapter_layers, adapter_parameters, inject_adapters
from malora_dist.config.adapter import AdapterConfig


def parameter_report(model_config, adapter: AdapterConfig) -> dict:

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    base = sum(p.numel() for p in model.parameters())
    inject_adapters(model, adapter)
    trainable = sum(p.numel() for p in adapter_parameters(model))
    every = sum(p.numel() for _, layer in adapter_layers(model) for _, p in layer.adapter_tensors())
    report = {
        "method": adapter.method,
        "base_params": base,
        "trainable_params": trainable,
        "frozen_adapter_params": every - trainable,
        "trainable_percent": 100.0 * trainable / base,
        "trainable_percent_of_all": 100.0 * trainable / (base + every),
        "adapted_layers": sum(1 for _ in adapter_layers(model)),
    }
    if adapter.is_moe:
        report.update(num_experts=adapter.num_experts, top_k=adapter.top_k)
    if adapter.has_subspace:
        report.update(shared_dim=adapter.d, expert_rank=adapter.r_bar, subspace=adapter.subspace,
                      shared_side=adapter.shared_side)
    else:
        report.update(rank=adapter.rank)
    if adapter.frozen_parts:
        report.update(frozen=sorted(adapter.frozen_parts))
    if adapter.dora:
        report.update(dora=True)
    return report
