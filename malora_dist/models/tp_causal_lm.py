"""The frozen base: a Hugging Face causal LM, tensor-parallel by its config's ``base_model_tp_plan``.

The HF model keeps its own modules, forward, attention kernels, rope variants, norms, sliding
windows, KV cache and ``generate``. Sharding replaces, in place: the linears the plan marks
(``tp_plan``), the input embedding and the LM head (vocab-parallel, ``tp_vocab``); this rank's
slice of every checkpoint tensor is then copied in (``tp_weights``). ``TPCausalLM`` holds the HF
model's children under their HF names (``model.layers.3.self_attn.q_proj``), so checkpoint keys,
adapter targets and exported adapters are HF's. A model whose config has no plan runs at tp = 1
with its plain ``nn.Linear`` layers (the adapters wrap those just as well).

Packed sequences: ``position_ids`` restarting at 0 in every example are all it takes; HF derives
the document mask from them (``find_packed_sequence_indices``), and its flash-attention path turns
them into variable-length kernels without any dense mask.

Entry points: ``shard_causal_lm`` (a loaded HF model, converted in place) and
``shard_causal_lm_from_pretrained`` (a local safetensors directory, read slice by slice).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from malora_dist.models.tp_linear import all_gather_last_dim, megatron_config, resolve_tp_group
from malora_dist.models.tp_plan import (
    apply_plan,
    check_plan,
    check_tp_divisibility,
    reduce_replicated_gradients,
    tp_plan,
)
from malora_dist.models.tp_vocab import VocabParallelHead, vocab_parallel_embedding
from malora_dist.models.tp_weights import SafetensorsSource, StateDictSource, load_shards
from malora_dist.runtime.groups import ParallelGroups

IGNORE_INDEX = -100


class TPCausalLM(nn.Module):
    """A sharded HF causal LM whose forward returns this rank's vocabulary shard of the logits."""

    def __init__(self, hf_model: nn.Module, tp_group):
        super().__init__()
        # The HF model runs forward and generate; its children are registered here under their
        # own names (not the HF model itself: that would prefix every key with one more level).
        self.__dict__["hf"] = hf_model
        for name, child in hf_model.named_children():
            self.add_module(name, child)
        self.config = hf_model.config
        self.tp_group = tp_group
        self.tp_size = tp_group.size()
        self.tp_rank = tp_group.rank()

    def train(self, mode: bool = True):
        self.hf.train(mode)  # the same modules, and the HF model's own flag
        return super().train(mode)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
    ) -> torch.Tensor:
        """Local logits (B, S, V/tp). Packed examples: ``position_ids`` restarting at 0 in each.
        ``attention_mask``: a custom boolean (B, 1, S, S) mask (True = may attend), or HF's
        mapping of such masks per layer type; None means causal within each packed example."""
        return self.hf(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
        ).logits

    def forward_cached(self, input_ids: torch.Tensor, cache=None):
        """``(local logits, cache)`` of the next tokens given HF's KV cache of the earlier ones (None:
        the first call, which starts one): a decoding step runs on the new token alone."""
        out = self.hf(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    def logits_at(self, rows, cols, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
        """Local logits (N, V/tp) at the positions (rows[i], cols[i]) only: the LM head, the
        largest matrix of a small model, runs on those rows alone."""
        with self.lm_head.only_at(rows, cols):
            return self(input_ids, position_ids, attention_mask)[0]

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
        """Full-vocabulary logits on every rank (no autograd): for tests and scoring."""
        return all_gather_last_dim(local_logits, self.tp_group)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None = None,
        *,
        use_cache: bool = True,
        synced: bool = False,
        stopping_criteria=None,
    ) -> torch.Tensor:
        """Greedy decoding by HF's ``generate`` with its KV cache; every tp rank gets the same
        tokens (the head gathers the full vocabulary). Rows that produced an EOS are padded with
        the first EOS id; decoding stops when every row has one. ``synced``: keep running forwards
        until every rank of the world has finished (ranks that decode different prompts, whose
        forwards are collectives, e.g. expert parallelism). ``stopping_criteria``: HF stopping criteria
        that end decoding early (``generation.StopWhen``: the answer is complete)."""
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        with self.lm_head.gathered():
            return self.hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos or None,
                pad_token_id=eos[0] if eos else None,
                use_cache=use_cache,
                synced_gpus=synced,
                stopping_criteria=stopping_criteria,
            )


def _shard(hf_model: nn.Module, source, groups: ParallelGroups, dtype, device) -> TPCausalLM:
    """Convert ``hf_model`` (real or on the meta device) in place and fill it from ``source``
    (None: a skeleton, left on the meta device with this rank's shapes)."""
    config = hf_model.config
    check_tp_divisibility(config, groups.tp)
    check_plan(config, groups.tp)
    tp_group = resolve_tp_group(groups)
    mp_config = megatron_config(groups.tp, dtype)
    base = hf_model.get_decoder()
    embedding = hf_model.get_input_embeddings()
    apply_plan(base, tp_plan(config), mp_config, tp_group)
    tp_embedding = vocab_parallel_embedding(embedding, mp_config, tp_group)
    hf_model.set_input_embeddings(tp_embedding)
    hf_model.set_output_embeddings(
        VocabParallelHead(
            config.hidden_size,
            config.vocab_size,
            mp_config=mp_config,
            tp_group=tp_group,
            tied_to=tp_embedding if config.tie_word_embeddings else None,
        )
    )
    if source is not None:
        _materialise(hf_model)
    model = TPCausalLM(hf_model, tp_group)
    if source is not None:
        load_shards(model, source, model.tp_rank, model.tp_size)
    # The HF norms may be in another dtype: cast every parameter to the base's (a bf16 norm output
    # for the bf16 linears after it). Buffers (the rotary inv_freq) stay fp32, as in HF.
    for param in model.parameters():
        param.data = param.data.to(dtype)
    reduce_replicated_gradients(base, tp_plan(config), tp_group)
    model.requires_grad_(False)
    model.eval()
    return model if device is None else model.to(device)


def _materialise(hf_model: nn.Module) -> None:
    """Give the modules still on the meta device (norms, rotary embeddings) real storage; their
    parameters are loaded next, their non-persistent buffers (inv_freq) are computed by HF's own
    initialisation. A no-op for a model loaded with weights."""
    for module in hf_model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in tensors):
            module.to_empty(device="cpu", recurse=False)
            if any(True for _ in module.buffers(recurse=False)):
                hf_model._init_weights(module)


def shard_causal_lm(
    hf_model: nn.Module,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TPCausalLM:
    """The tensor-parallel base from a loaded HF causal LM, which is converted in place (its plan's
    linears, embedding and head are replaced by this rank's copied slices): do not use
    ``hf_model`` afterwards. ``dtype`` defaults to the model's."""
    dtype = dtype or next(hf_model.parameters()).dtype
    source = StateDictSource(hf_model.state_dict())  # holds the replaced tensors until copied
    return _shard(hf_model, source, groups, dtype, device)


def shard_causal_lm_skeleton(config, groups: ParallelGroups, *, dtype: torch.dtype) -> TPCausalLM:
    """This rank's sharded model from an HF config, every tensor on the meta device: the shapes and
    dtypes a real build allocates, without weights (the planner, ``malora_dist.plan``)."""

    check_tp_divisibility(config, groups.tp)
    check_plan(config, groups.tp)
    with torch.device("meta"):  # megatron's layers allocate with torch.empty: meta too, here
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return _shard(hf_model.eval(), None, groups, dtype, None)


def shard_causal_lm_from_pretrained(
    directory: str,
    groups: ParallelGroups,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TPCausalLM:
    """Build the sharded model from a local HF safetensors directory, reading only this rank's
    slices: the HF model is built on the meta device, so the full model is never materialised."""

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    check_tp_divisibility(config, groups.tp)
    check_plan(config, groups.tp)
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return _shard(hf_model.eval(), SafetensorsSource(directory), groups, dtype, device)
