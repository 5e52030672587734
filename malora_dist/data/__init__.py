"""Multi-task data: records → prompts → tokens → packed sequences → mixed global batches.

``build_multitask_data(DataConfig.from_dict(cfg["data"]), tokenizer, seed)`` builds everything;
``data.sampler(global_batch_size)`` gives the global batch of every step, and
``data.micro_batches(sampler, step, dp_rank, dp_size, micro_batch_size)`` a rank's tensors. The
evaluation builds its prompts with ``build_prompt`` / ``option_continuations`` and tokenises them
with ``encode_prompts`` / ``encode_continuations``, exactly as training does.
"""

from malora_dist.config.data import DataConfig, TaskConfig
from malora_dist.data.batches import BATCH_KEYS, PackedSequences, pack_examples, segment_causal_mask
from malora_dist.data.errors import DataError
from malora_dist.data.items import MultipleChoice, format_instruction
from malora_dist.data.mixing import GlobalBatchSampler, mixing_probabilities
from malora_dist.data.pipeline import MultiTaskData, TaskStats, build_multitask_data
from malora_dist.data.prompts import (
    Example,
    build_prompt,
    option_continuations,
    parse_multiple_choice,
    record_to_example,
)
from malora_dist.data.tokenize import (
    IGNORE_INDEX,
    TokenizedExample,
    encode_continuations,
    encode_prompts,
    tokenize_examples,
)

__all__ = [
    "BATCH_KEYS", "DataConfig", "DataError", "Example", "GlobalBatchSampler", "IGNORE_INDEX",
    "MultiTaskData", "MultipleChoice", "PackedSequences", "TaskConfig", "TaskStats", "TokenizedExample",
    "build_multitask_data", "build_prompt", "encode_continuations", "encode_prompts", "format_instruction",
    "mixing_probabilities", "option_continuations", "pack_examples", "parse_multiple_choice",
    "record_to_example", "segment_causal_mask", "tokenize_examples",
]
