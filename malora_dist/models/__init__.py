"""The frozen base model: loading from HF/GGUF and its megatron-core tensor-parallel form."""

from malora_dist.models.loading import (
    build_tiny_causal_lm,
    load_hf_model,
    load_tokenizer,
    smollm2_gguf_path,
)
from malora_dist.models.tp_causal_lm import (
    TPCausalLM,
    shard_causal_lm,
    shard_causal_lm_from_pretrained,
    shard_causal_lm_skeleton,
)
from malora_dist.models.tp_linear import ColumnParallelBase, RowParallelBase, TensorParallelBase
from malora_dist.models.tp_plan import check_plan, check_tp_divisibility

__all__ = [
    "ColumnParallelBase",
    "RowParallelBase",
    "TPCausalLM",
    "TensorParallelBase",
    "build_tiny_causal_lm",
    "check_plan",
    "check_tp_divisibility",
    "load_hf_model",
    "load_tokenizer",
    "shard_causal_lm",
    "shard_causal_lm_from_pretrained",
    "shard_causal_lm_skeleton",
    "smollm2_gguf_path",
]
