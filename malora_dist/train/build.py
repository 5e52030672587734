"""Build the model of a run: frozen base → tensor-parallel copy → adapters (full, seeded) → layout.

The order is the house rule (DESIGN.md §5): model code holds no parallelism; the base is sharded
by ``malora_dist.models``, adapters are injected with full tensors drawn from the same seed on every
rank (so every layout starts from the same adapter), then ``parallelize_adapters`` keeps each
rank's slice and connects the process groups.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..adapters.inject import inject_adapters
from ..models import (build_tiny_causal_lm, load_hf_model, load_tokenizer, shard_causal_lm,
                      shard_causal_lm_from_pretrained, smollm2_gguf_path)
from ..parallel.groups import ParallelGroups
from ..logging_utils import get_logger
from ..parallel.parallelize import parallelize_adapters
from ..parallel.placement import measure_link
from .config import ModelConfig, RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _gguf(name: str) -> str:
    return smollm2_gguf_path() if name == "smollm2" else name


def load_run_tokenizer(model: ModelConfig):
    if model.tokenizer is not None:
        source = _gguf(model.tokenizer)
    elif model.gguf_file is not None:
        source = _gguf(model.gguf_file)
    elif model.name_or_path is not None:
        source = model.name_or_path
    else:
        source = smollm2_gguf_path()
    return _cached_tokenizer(source)


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(source: str):
    """Parsing a GGUF tokenizer takes seconds; runs and evaluations in one process share it."""
    return load_tokenizer(*os.path.split(source)) if source.endswith(".gguf") else load_tokenizer(source)


def load_base(model: ModelConfig, groups: ParallelGroups, device: torch.device, seed: int) -> nn.Module:
    """The frozen, tensor-parallel base (tp = 1 included: one code path for every layout)."""
    dtype = DTYPES[model.dtype]
    if model.name_or_path is not None and os.path.isdir(model.name_or_path) and any(
        f.endswith(".safetensors") for f in os.listdir(model.name_or_path)
    ):
        # Shard by shard: this rank reads only its slices, never the whole model.
        return shard_causal_lm_from_pretrained(model.name_or_path, groups, dtype=dtype, device=device)
    return shard_causal_lm(load_hf_base(model, seed), groups, dtype=dtype, device=device)


def load_hf_base(model: ModelConfig, seed: int) -> nn.Module:
    """The run's base as a plain Hugging Face model in fp32 (what ``load_base`` shards; generation
    and lm-evaluation-harness use it whole, with its KV cache)."""
    if model.config is not None:
        return build_tiny_causal_lm(model.config, seed=seed, dtype=torch.float32)
    if model.gguf_file is not None:
        return load_hf_model(*os.path.split(_gguf(model.gguf_file)), dtype=torch.float32)
    return load_hf_model(model.name_or_path, dtype=torch.float32)


class CheckpointedLayer(nn.Module):
    """Recompute a decoder layer in backward. Every rank recomputes the same layers in the same
    order, so the collectives inside (all-to-all, tp reductions) stay matched."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        return checkpoint(self.layer, *args, use_reentrant=False)


def build_model(config: RunConfig, groups: ParallelGroups, device: torch.device) -> nn.Module:
    model = load_base(config.model, groups, device, config.train.seed)
    torch.manual_seed(config.train.seed)  # the adapter init: the same full tensors on every rank
    inject_adapters(model, config.adapter)
    placement = config.parallel.expert_placement
    link = measure_link(groups.dp_group, device) if placement == "auto" and groups.ep > 1 else None
    tokens_per_rank = config.train.global_batch_size // groups.dp * config.data.seq_len
    micro_batches = config.train.global_batch_size // (groups.dp * config.train.micro_batch_size)
    decisions = parallelize_adapters(model, groups, placement, tokens_per_rank=tokens_per_rank, link=link,
                                     micro_batches=micro_batches)
    if decisions:
        counts = {p: sum(1 for d in decisions.values() if d == p) for p in ("ep", "replicate")}
        get_logger().info("expert placement %s: %d layer(s) ep, %d replicated%s", placement, counts["ep"],
                          counts["replicate"], f" (link latency {link.latency_s * 1e3:.2f} ms, "
                          f"{link.bytes_per_s / 1e9:.2f} GB/s)" if link else "")
    model.expert_placement = decisions
    if config.train.activation_checkpointing:
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = CheckpointedLayer(layers[i])
    return model
