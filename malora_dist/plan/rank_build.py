"""One rank's real build on the meta device, and what it holds.

The run config is checked by ``validate_run`` (what a launch checks first), the base is sharded by
``shard_causal_lm_skeleton`` (the launch's sharding with no weights read) and the adapters are
placed and injected by ``build_adapters`` (the launch's own call). Errors a launch would hit —
indivisible heads, experts not divisible by ep, a plan style that cannot shard — come out of that
same code, here.

Memory per rank, each from the built tensors: frozen parameters and buffers (the base, adapter
parts kept frozen), trainable parameters (fp32 master weights), their fp32 gradients, AdamW's two
fp32 moments and step counter per parameter (``train.optim``), the expert tensors among the
trainable ones, and the activations saved for backward by one micro-batch's forward.

Activations are counted by running the real forward on meta tensors with saved-tensor hooks
(storages counted once, parameters and the mask excluded). Two departures from a launch: attention
runs its math form with an explicit causal mask (the S×S probabilities are saved, as eager
attention does; a flash kernel keeps only row statistics), and layers whose experts sit on other
ranks are run with their experts local (the exchange cannot run without data: its counts are read
on the host); their received rows are added, k·T rows of the width that travels. On the tiny model
the count is 10 % under what a gloo run saves (``tests/test_plan.py``). With activation
checkpointing (HF's per-decoder-layer recompute, ``train.build``): the saved tensors outside the
layers, each layer's input, and one layer's full activations during its recompute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from malora_dist.adapters.inject import adapter_layers, adapter_parameters
from malora_dist.adapters.tags import is_expert
from malora_dist.config.loading import load_hf_config_dict, load_yaml
from malora_dist.config.run import RunConfig, apply_overrides, build_run_config
from malora_dist.models import shard_causal_lm_skeleton
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.train.build import DTYPES, enable_activation_checkpointing, placement_inputs
from malora_dist.train.preflight import model_hf_config, validate_run


def plan_run_config(path: str, overrides: Optional[list] = None, model_config: Optional[str] = None) -> RunConfig:
    """The run config, with ``model_config`` (an HF config.json) standing in for the model's weights."""
    raw = apply_overrides(load_yaml(path), overrides or [])
    if model_config is not None:
        hf = load_hf_config_dict(model_config)
        dtype = (raw.get("model") or {}).get("dtype", "float32")
        raw["model"] = {"config": hf, "dtype": dtype}
    config = build_run_config(raw)
    if model_hf_config(config) is None:
        raise ValueError(f"{path}: model.name_or_path {config.model.name_or_path!r} is a hub name, whose "
                         "config is not read offline: pass --model-config CONFIG.json")
    return config


@dataclass
class RankMemory:
    frozen_bytes: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    expert_bytes: int  # the expert tensors among the trainable ones
    activation_bytes: int  # one micro-batch, no checkpointing
    checkpointed_activation_bytes: int

    def total(self, checkpointing: bool) -> int:
        acts = self.checkpointed_activation_bytes if checkpointing else self.activation_bytes
        return self.frozen_bytes + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes + acts


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_rank_model(config: RunConfig, groups, link=None, placement: Optional[str] = None) -> tuple[nn.Module, dict]:
    """(this rank's model on the meta device, {MoE layer: placement}) — the launch's build steps."""
    validate_run(config, groups.world)
    dtype = DTYPES[config.model.dtype]
    model = shard_causal_lm_skeleton(model_hf_config(config), groups, dtype=dtype)
    placement = placement or config.parallel.expert_placement
    auto = placement == "auto" and config.adapter.is_moe and groups.ep > 1
    tokens_per_rank, micro_batches = placement_inputs(config, groups)
    decisions = build_adapters(model, config.adapter, groups, placement, seed=config.train.seed,
                               tokens_per_rank=tokens_per_rank, link=link if auto else None,
                               micro_batches=micro_batches, dtype=dtype,
                               share_exchanges=config.parallel.share_exchanges)
    return model, decisions


def static_memory(model: nn.Module) -> dict:
    trainable = adapter_parameters(model)
    ids = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if id(p) not in ids] + list(model.buffers())
    return dict(frozen_bytes=_nbytes(frozen), trainable_bytes=_nbytes(trainable),
                gradient_bytes=_nbytes(trainable),  # fp32 gradients of fp32 master weights
                optimizer_bytes=sum(2 * p.numel() * 4 + 4 for p in trainable),  # exp_avg, exp_avg_sq, step
                expert_bytes=_nbytes(p for p in trainable if is_expert(p)))


def meta_batch(config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch of token ids and its causal mask, on the meta device."""
    b, s = config.train.micro_batch_size, config.data.seq_len
    ids = torch.zeros(b, s, dtype=torch.long, device="meta")
    return ids, torch.ones(b, 1, s, s, dtype=torch.bool, device="meta").tril()


def micro_batch_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.token_losses(model(ids, attention_mask=mask), ids).sum()


def saved_activation_bytes(model: nn.Module, config: RunConfig) -> int:
    """Bytes of the tensors one micro-batch's forward saves for backward (each storage once)."""
    ids, mask = meta_batch(config)
    excluded = {p.untyped_storage()._cdata for p in [*model.parameters(), *model.buffers()]}
    excluded.add(mask.untyped_storage()._cdata)
    saved: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in excluded:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        micro_batch_loss(model, ids, mask)
    return sum(saved.values())


def local_experts_model(config: RunConfig, model: nn.Module, decisions: dict, groups) -> nn.Module:
    """``model`` itself, or where some experts are split a build of it with every expert local:
    the one whose forward runs on meta tensors."""
    if not any(d == "ep" for d in decisions.values()):
        return model
    return build_rank_model(config, groups, placement="replicate")[0]


def rank_memory(config: RunConfig, model: nn.Module, decisions: dict, local: nn.Module,
                activations: Optional[tuple] = None) -> RankMemory:
    """``model``: this rank's build (``build_rank_model``); ``local``: ``local_experts_model``'s.
    ``activations``: another position's (no checkpointing, with it) to reuse — every position
    holds the same activation shapes (tp and ep split evenly)."""
    static = static_memory(model)
    if activations is not None:
        return RankMemory(**static, activation_bytes=activations[0], checkpointed_activation_bytes=activations[1])
    full = saved_activation_bytes(local, config)
    # what stays saved outside the decoder layers: the same forward with every layer checkpointed
    enable_activation_checkpointing(local)
    outside = saved_activation_bytes(local, config)
    local.hf.activation_checkpointing_disable()
    hf = local.config
    tokens = config.train.micro_batch_size * config.data.seq_len
    act_bytes = torch.empty((), dtype=DTYPES[config.model.dtype]).element_size()
    rows = sum(_travelling_rows(layer, tokens) for name, layer in adapter_layers(model)
               if decisions.get(name) == "ep") * act_bytes
    layers = hf.num_hidden_layers
    per_layer = (full - outside) / layers
    with_ac = outside + layers * tokens * hf.hidden_size * act_bytes + per_layer + rows / layers
    return RankMemory(**static, activation_bytes=int(full + rows), checkpointed_activation_bytes=int(with_ac))


def _travelling_rows(layer, tokens: int) -> int:
    """Numbers received per micro-batch by a layer whose experts are split: k·T rows of what travels."""
    return layer.variant.top_k * tokens * layer.variant.sent_width
