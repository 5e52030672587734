"""Parameter report: ``python -m malora_dist.params --model-config CONFIG --adapter-config YAML``.

The model is built on the meta device, so a 70B config answers in seconds without allocating weights.
Prints JSON with ``base_params``, ``trainable_params`` and ``trainable_percent`` (= 100 × trainable / base).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .adapters.config import AdapterConfig
from .adapters.inject import adapter_layers, adapter_parameters, inject_adapters


def load_model_config(path: str):
    """An HF ``config.json`` file or a directory holding one."""
    from transformers import AutoConfig

    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    if not os.path.isfile(path):
        raise ValueError(f"--model-config {path!r} is neither a config.json file nor a directory holding one")
    with open(path) as f:
        data = json.load(f)
    if "model_type" not in data:
        raise ValueError(f"{path} has no 'model_type' key: is it a Hugging Face config.json?")
    return AutoConfig.for_model(**data)


def parameter_report(model_config, adapter: AdapterConfig) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    base = sum(p.numel() for p in model.parameters())
    inject_adapters(model, adapter)
    trainable = sum(p.numel() for p in adapter_parameters(model))
    report = {
        "method": adapter.method,
        "base_params": base,
        "trainable_params": trainable,
        "trainable_percent": 100.0 * trainable / base,
        "adapted_layers": sum(1 for _ in adapter_layers(model)),
    }
    if adapter.is_moe:
        report.update(num_experts=adapter.num_experts, top_k=adapter.top_k)
    if adapter.method == "malora":
        report.update(shared_dim=adapter.d, expert_rank=adapter.r_bar)
    else:
        report.update(rank=adapter.rank)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", required=True, help="HF config.json or a directory holding one")
    parser.add_argument("--adapter-config", required=True,
                        help="YAML with the adapter keys at top level, or a training config with an 'adapter:' section")
    args = parser.parse_args(argv)
    try:
        report = parameter_report(load_model_config(args.model_config), AdapterConfig.from_yaml(args.adapter_config))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
