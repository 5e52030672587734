"""Build the model of a run: frozen base → tensor-parallel copy → adapters built for the layout.

The order is the house rule (docs/ARCHITECTURE.md §9.1 (run order), §12 (house rules)): model code
holds no parallelism; the base is sharded by ``malora_dist.models``, then ``build_adapters`` injects
adapters built for their layout (each rank allocates its own experts and tensor-parallel slices, with
the values a full build from the run's seed gives them, so every layout starts from the same adapter).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from malora_dist.config.run import ModelConfig, RunConfig
from malora_dist.models import (
    build_tiny_causal_lm,
    load_hf_model,
    load_tokenizer,
    shard_causal_lm,
    shard_causal_lm_from_pretrained,
    smollm2_gguf_path,
)
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.parallel.placement import measure_link
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.log import get_logger

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


def placement_inputs(config: RunConfig, groups: ParallelGroups) -> tuple[int, int]:
    """(tokens per rank per step, micro-batches per rank per step): what ``auto`` placement prices."""
    tokens_per_rank = config.train.global_batch_size // groups.dp * config.data.seq_len
    return tokens_per_rank, config.train.global_batch_size // (groups.dp * config.train.micro_batch_size)


def build_model(config: RunConfig, groups: ParallelGroups, device: torch.device) -> nn.Module:
    model = load_base(config.model, groups, device, config.train.seed)
    placement = config.parallel.expert_placement
    auto = placement == "auto" and config.adapter.is_moe and groups.ep > 1
    reduce_group = groups.dp_group if groups.dp > groups.ep else None  # else the same ranks as ep
    link = measure_link(groups.ep_group, device, reduce_group=reduce_group) if auto else None
    tokens_per_rank, micro_batches = placement_inputs(config, groups)
    decisions = build_adapters(model, config.adapter, groups, placement, seed=config.train.seed,
                               tokens_per_rank=tokens_per_rank, link=link, micro_batches=micro_batches,
                               dtype=DTYPES[config.model.dtype], share_exchanges=config.parallel.share_exchanges)
    if decisions:
        counts = {p: sum(1 for d in decisions.values() if d == p) for p in ("ep", "replicate")}
        get_logger().info("expert placement %s: %d layer(s) ep, %d replicated%s", placement, counts["ep"],
                          counts["replicate"], f" (link latency {link.latency_s * 1e3:.2f} ms, "
                          f"{link.bytes_per_s / 1e9:.2f} GB/s)" if link else "")
    model.expert_placement = decisions
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer in backward: HF's own checkpointing of its decoder layers
    (which keep their attributes and names), non-reentrant so frozen inputs need no grad hack.
    Every rank recomputes the same layers in the same order, so the collectives inside
    (all-to-all, tp reductions) stay matched."""
    model.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
