"""The vocabulary-parallel ends of the base: input embedding and LM head, split on the vocabulary.

They replace the HF model's ``embed_tokens`` and ``lm_head`` (the big matrices, and why tensor
parallelism pays off for small models with large vocabularies). The head returns this rank's
vocabulary shard of the logits, which megatron's ``vocab_parallel_cross_entropy`` takes as is;
whatever the HF model does to the logits afterwards (Gemma's soft-capping, Granite's scaling) is
element-wise, so it runs on the shard unchanged.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from torch import nn

from malora_dist.models.tp_linear import all_gather_last_dim, never_initialise


class ScaledVocabParallelEmbedding(VocabParallelEmbedding):
    """A vocab-parallel embedding that multiplies by ``embed_scale`` as Gemma's embedding does."""

    def __init__(self, *args, embed_scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * torch.tensor(self.embed_scale, dtype=self.weight.dtype)


def vocab_parallel_embedding(hf_embedding: nn.Embedding, mp_config, tp_group) -> VocabParallelEmbedding:
    """The replacement of ``hf_embedding``, keeping a scale it applies (``scalar_embed_scale``:
    Gemma's float copy of its buffer, readable also when the model skeleton is on the meta device)."""
    shape = dict(init_method=never_initialise, config=mp_config, tp_group=tp_group)
    sizes = (hf_embedding.num_embeddings, hf_embedding.embedding_dim)
    scale = getattr(hf_embedding, "scalar_embed_scale", None)
    if scale is None and hasattr(hf_embedding, "embed_scale"):
        raise ValueError(
            f"{type(hf_embedding).__name__} scales its output but has no scalar_embed_scale: "
            "this embedding is not supported by the vocab-parallel base"
        )
    if scale is None:
        return VocabParallelEmbedding(*sizes, **shape)
    return ScaledVocabParallelEmbedding(*sizes, embed_scale=float(scale), **shape)


class VocabParallelHead(ColumnParallelLinear):
    """The LM head on this rank's vocabulary rows; a tied head multiplies by the embedding's shard.

    Two switches, set only through the context managers below: ``gather`` returns the full
    vocabulary (generation, whose sampler needs every logit), ``positions`` computes logits at
    chosen (row, column) positions only (scoring a few tokens of long rows).
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, mp_config, tp_group, tied_to=None):
        super().__init__(
            hidden_size,
            vocab_size,
            config=mp_config,
            init_method=never_initialise,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=tied_to is not None,
            tp_group=tp_group,
        )
        # Kept outside the module tree: registered, the embedding (and its weight) would appear twice.
        self.__dict__["tied_to"] = tied_to
        self.tp_group = tp_group
        self.gather = False
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.positions is not None:
            hidden = hidden[self.positions][None]
        weight = self.tied_to.weight if self.tied_to is not None else None
        logits, _ = super().forward(hidden, weight=weight)
        return all_gather_last_dim(logits, self.tp_group) if self.gather else logits

    @contextlib.contextmanager
    def gathered(self):
        self.gather = True
        try:
            yield
        finally:
            self.gather = False

    @contextlib.contextmanager
    def only_at(self, rows: torch.Tensor, cols: torch.Tensor):
        self.positions = (rows, cols)
        try:
            yield
        finally:
            self.positions = None
