"""Tensor-parallel frozen copy of a Hugging Face LLaMA-family causal LM (LLaMA, Mistral, Qwen2).

Layout (DESIGN.md §2): q, k, v, gate, up are column-parallel; o and down row-parallel; the embedding
and the LM head are vocab-parallel (a tied head multiplies by the embedding's own shard); the loss is
megatron's ``vocab_parallel_cross_entropy``. Heads and KV heads are split contiguously over tp,
which keeps every query head with its KV head under GQA. RMSNorm, the rotary embedding (every
``rope_type`` HF knows, e.g. llama3) and ``apply_rotary_pos_emb`` are HF's own, taken from the
model's modeling module. Module names mirror HF's, so checkpoint keys are module paths and adapters
find ``self_attn.q_proj`` where they expect it.

Entry points: ``shard_causal_lm`` (from a loaded HF model) and ``shard_causal_lm_from_pretrained``
(from a local safetensors directory, one slice at a time).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn
from transformers.activations import ACT2FN

from malora_dist.models.tp_linear import (
    ColumnParallelBase,
    RowParallelBase,
    megatron_config,
    never_initialise,
    resolve_tp_group,
)
from malora_dist.models.tp_weights import SafetensorsSource, StateDictSource, load_shards
from malora_dist.parallel.groups import ParallelGroups

# HF model_type -> class-name prefix in transformers.models.<type>.modeling_<type>
SUPPORTED_MODEL_TYPES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100


def check_tp_divisibility(config, tp: int) -> None:
    """Raise a ValueError naming the sizes tp fails to divide and the tp values that work."""
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    bad = [f"{name}={size}" for name, size in sizes.items() if size % tp]
    if bad:
        common = math.gcd(*sizes.values())
        working = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(
            f"tensor parallelism tp={tp} does not divide {', '.join(bad)} of this "
            f"{config.model_type} model: choose tp from {working}"
        )


def _hf_parts(config):
    """HF's own RMSNorm class, rotary-embedding class and rotary function for this model type."""
    prefix = SUPPORTED_MODEL_TYPES.get(config.model_type)
    if prefix is None:
        raise ValueError(
            f"model_type {config.model_type!r} is not supported by the tensor-parallel base: "
            f"use one of {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    module = importlib.import_module(
        f"transformers.models.{config.model_type}.modeling_{config.model_type}"
    )
    return (
        getattr(module, f"{prefix}RMSNorm"),
        getattr(module, f"{prefix}RotaryEmbedding"),
        module.apply_rotary_pos_emb,
    )


def _sliding_windows(config) -> list[int | None]:
    """Per-layer attention window as HF applies it (Mistral: all layers; Qwen2: per layer_types)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]


def attention_mask(
    seq_len: int, segment_ids: torch.Tensor | None, window: int | None, device
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, S, S) mask, True = may attend; None means plain causal."""
    if segment_ids is None and window is None:
        return None
    query = torch.arange(seq_len, device=device)[:, None]
    key = torch.arange(seq_len, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed = allowed & (query - key < window)
    allowed = allowed[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed


class TPAttention(nn.Module):
    """Self-attention on this rank's heads; only calls ``self.<proj>(x)``, so adapters can wrap them."""

    def __init__(self, config, mp_config, tp_group, biased: Collection[str], apply_rotary, window):
        super().__init__()
        tp = tp_group.size()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.local_heads = config.num_attention_heads // tp
        self.local_kv_heads = config.num_key_value_heads // tp
        self.sliding_window = window
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.apply_rotary = apply_rotary
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        common = dict(config=mp_config, tp_group=tp_group)
        self.q_proj = ColumnParallelBase(config.hidden_size, q_size, bias="q_proj" in biased, **common)
        self.k_proj = ColumnParallelBase(config.hidden_size, kv_size, bias="k_proj" in biased, **common)
        self.v_proj = ColumnParallelBase(config.hidden_size, kv_size, bias="v_proj" in biased, **common)
        self.o_proj = RowParallelBase(q_size, config.hidden_size, bias="o_proj" in biased, **common)

    def forward(self, x, cos, sin, masks: dict) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        q = self.q_proj(x).view(batch, seq_len, self.local_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq_len, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq_len, self.local_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.apply_rotary(q, k, cos, sin)
        mask = masks[self.sliding_window]
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.attention_dropout if self.training else 0.0,
            enable_gqa=self.local_heads != self.local_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


class TPMLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, the intermediate activation sharded over tp."""

    def __init__(self, config, mp_config, tp_group, biased: Collection[str]):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        common = dict(config=mp_config, tp_group=tp_group)
        self.gate_proj = ColumnParallelBase(hidden, inner, bias="gate_proj" in biased, **common)
        self.up_proj = ColumnParallelBase(hidden, inner, bias="up_proj" in biased, **common)
        self.down_proj = RowParallelBase(inner, hidden, bias="down_proj" in biased, **common)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class TPDecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config, mp_config, tp_group, biased, norm_cls, apply_rotary, window):
        super().__init__()
        self.self_attn = TPAttention(config, mp_config, tp_group, biased, apply_rotary, window)
        self.mlp = TPMLP(config, mp_config, tp_group, biased)
        self.input_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, h, cos, sin, masks) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, masks)
        return h + self.mlp(self.post_attention_layernorm(h))


class TPDecoder(nn.Module):
    """The ``model`` part of an HF causal LM: embedding, decoder layers, final norm, rotary cache."""

    def __init__(self, config, mp_config, tp_group, biased):
        super().__init__()
        norm_cls, rotary_cls, apply_rotary = _hf_parts(config)
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size,
            config.hidden_size,
            init_method=never_initialise,
            config=mp_config,
            tp_group=tp_group,
        )
        self.layers = nn.ModuleList(
            TPDecoderLayer(config, mp_config, tp_group, biased, norm_cls, apply_rotary, window)
            for window in _sliding_windows(config)
        )
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_cls(config=config)


class TPCausalLM(nn.Module):
    """Tensor-parallel causal LM whose forward returns this rank's vocabulary shard of the logits."""

    def __init__(self, config, tp_group, *, dtype: torch.dtype, biased: Collection[str] = ()):
        super().__init__()
        self.config = config
        self.tp_group = tp_group
        self.tp_size = tp_group.size()
        self.tp_rank = tp_group.rank()
        mp_config = megatron_config(self.tp_size, dtype)
        self.model = TPDecoder(config, mp_config, tp_group, frozenset(biased))
        self.tied = bool(config.tie_word_embeddings)
        self.lm_head = ColumnParallelLinear(
            config.hidden_size,
            config.vocab_size,
            config=mp_config,
            init_method=never_initialise,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=self.tied,
            tp_group=tp_group,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Local logits (B, S, V/tp). ``segment_ids`` (B, S) confine attention to equal ids (packing,
        padding) on top of the causal mask; packed segments want ``position_ids`` restarting at 0."""
        batch, seq_len = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(h, position_ids)
        windows = {layer.self_attn.sliding_window for layer in self.model.layers}
        masks = {w: attention_mask(seq_len, segment_ids, w, input_ids.device) for w in windows}
        for layer in self.model.layers:
            h = layer(h, cos, sin, masks)
        h = self.model.norm(h)
        logits, _ = self.lm_head(h, weight=self.model.embed_tokens.weight if self.tied else None)
        return logits

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (B, S) from local logits; HF convention: ``labels`` aligned with
        ``input_ids``, position t predicts labels[t + 1]; -100 and the last position give 0."""
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        valid = shifted != IGNORE_INDEX
        # megatron's cross-entropy works in place on fp32 logits: hand it a copy
        losses = vocab_parallel_cross_entropy(
            logits.to(torch.float32, copy=True), torch.where(valid, shifted, 0)
        )
        return torch.where(valid, losses, 0.0)

    @torch.no_grad()
    def gather_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits on every rank (no autograd): for tests and generation."""
        if self.tp_size == 1:
            return local_logits
        parts = [torch.empty_like(local_logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, local_logits.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Greedy decoding without a KV cache (every rank gets the same tokens). Rows that produced
        an EOS are padded with the first EOS id; decoding stops when every row has one."""
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        eos_ids = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            next_ids = self.gather_logits(self(input_ids)[:, -1]).argmax(dim=-1)
            if eos:
                next_ids = torch.where(finished, eos_ids[0], next_ids)
                finished |= torch.isin(next_ids, eos_ids)
            input_ids = torch.cat([input_ids, next_ids[:, None]], dim=1)
            if eos and bool(finished.all()):
                break
        return input_ids


def _biased_projections(keys: Collection[str]) -> frozenset[str]:
    """Which projections carry a bias (Qwen2: q, k, v; LLaMA with attention_bias/mlp_bias: more)."""
    found = set()
    for module, names in (("self_attn", ATTENTION_PROJECTIONS), ("mlp", MLP_PROJECTIONS)):
        found |= {name for name in names if f"model.layers.0.{module}.{name}.bias" in keys}
    return frozenset(found)


def _build(config, source, groups: ParallelGroups, dtype, device) -> TPCausalLM:
    check_tp_divisibility(config, groups.tp)
    tp_group = resolve_tp_group(groups)
    model = TPCausalLM(config, tp_group, dtype=dtype, biased=_biased_projections(source.keys()))
    load_shards(model, source, model.tp_rank, model.tp_size)
    # The HF norms are built in the default dtype: cast every parameter to the base's dtype (a bf16
    # norm output for the bf16 linears after it). Buffers (the rotary inv_freq) stay fp32, as in HF.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    model.requires_grad_(False)
    return model if device is None else model.to(device)


def shard_causal_lm(
    hf_model: nn.Module,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TPCausalLM:
    """Tensor-parallel frozen copy of a loaded HF LlamaForCausalLM / MistralForCausalLM /
    Qwen2ForCausalLM: this rank's slices are copied; ``dtype`` defaults to the model's."""
    dtype = dtype or next(hf_model.parameters()).dtype
    return _build(hf_model.config, StateDictSource(hf_model.state_dict()), groups, dtype, device)


def shard_causal_lm_from_pretrained(
    directory: str,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TPCausalLM:
    """Build the sharded model from a local HF safetensors directory, reading only this rank's
    slices (the full model is never materialised): the path for models too large for one rank."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    return _build(config, SafetensorsSource(directory), groups, dtype, device)
