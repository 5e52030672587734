"""Evaluate in the started process group: build the model, split the examples over dp, gather to rank 0."""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from malora_dist.config.run import RunConfig
from malora_dist.evaluation.report import task_entry
from malora_dist.evaluation.scoring import generate_answers, make_item, score_multiple_choice
from malora_dist.evaluation.tasks import EvalTask, load_eval_tasks, task_configs_from_specs
from malora_dist.inference.model import build_eval_model, serving_config, validate_eval_layout
from malora_dist.parallel.adapter_files import read_adapter_config
from malora_dist.runtime.distributed import init_distributed, pick_backend_and_device, shutdown_distributed
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.log import setup_logging
from malora_dist.train.build import load_run_tokenizer

# A row holds several examples' token trees; a forward takes a few rows. Short rows keep the
# attention (quadratic in the row, and computed across the examples it then masks) small
# against the linear layers; a few rows per forward keep the matmuls large enough.
ROW_TOKENS = 256
ROWS_PER_BATCH = 4


def evaluate(model, tasks: list[EvalTask], tokenizer: Any, chat: bool, max_len: int, groups: ParallelGroups,
             device: torch.device, row_tokens: int = ROW_TOKENS,
             rows_per_batch: int = ROWS_PER_BATCH) -> Optional[dict]:
    """Score ``tasks`` with ``model``; every rank calls this; rank 0 returns ``{name: task entry}``.

    dp rank r scores examples r, r + dp, … of the list of all tasks' examples; tp peers score the
    same ones. ``max_len`` caps prompt + continuation tokens (prompts are cut from the left).
    """

    chat_tokenizer = tokenizer if chat else None
    items = [make_item((t, i), example, task.style, task.metric, chat_tokenizer)
             for t, task in enumerate(tasks) for i, example in enumerate(task.examples)]
    mine = items[groups.dp_rank::groups.dp]
    rank0 = dist.get_rank() == 0
    model.eval()
    with tqdm(total=len(mine), desc="evaluate", disable=not rank0, dynamic_ncols=True) as progress:
        results = score_multiple_choice(model, [i for i in mine if i.options], tokenizer, chat, max_len, groups,
                                        device, row_tokens, rows_per_batch, progress)
        results.update(generate_answers(model, [i for i in mine if not i.options], tokenizer, chat, max_len, groups,
                                        device, progress))
    gathered = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(results, gathered, dst=0)
    if not rank0:
        return None
    merged = {key: value for part in gathered for key, value in part.items()}
    return {task.name: task_entry(task.style, task.metric, [i for i in items if i.key[0] == t], merged)
            for t, task in enumerate(tasks)}


def evaluate_run(config: RunConfig, task_configs: Optional[list] = None, adapter_dir: Optional[str] = None,
                 limit: Optional[int] = None, row_tokens: int = ROW_TOKENS,
                 rows_per_batch: int = ROWS_PER_BATCH) -> Optional[dict]:
    """The whole evaluation of a run config (the default process group must be started); rank 0
    returns the report, the other ranks None.

    task_configs: ``--task`` tasks (``tasks.task_configs_from_specs``), default the config's own
    held-out sets; limit: the first N examples of each task.
    """
    start = time.time()
    adapter = read_adapter_config(adapter_dir) if adapter_dir is not None else None
    validate_eval_layout(config, dist.get_world_size(), adapter)
    log = setup_logging(dist.get_rank())
    _, device = pick_backend_and_device(int(os.environ.get("LOCAL_RANK", "0")))
    groups = ParallelGroups.build(config.parallel.tp, config.parallel.ep,
                                  adapter.num_experts if adapter is not None and adapter.is_moe else None)
    tokenizer = load_run_tokenizer(config.model)
    tasks = load_eval_tasks(config.data, tokenizer, config.train.seed, task_configs, limit)
    model = build_eval_model(config, groups, device, adapter_dir)
    log.info("evaluating %s on %d process(es) (tp=%d, dp=%d, ep=%d): %s",
             adapter_dir or "the base model", dist.get_world_size(), groups.tp, groups.dp, groups.ep,
             ", ".join(f"{t.name} ({len(t.examples)} {t.style}, {t.metric})" for t in tasks))
    scoring_start = time.time()
    entries = evaluate(model, tasks, tokenizer, config.data.use_chat_template, config.data.seq_len, groups, device,
                       row_tokens, rows_per_batch)
    log.info("set up in %.1f s, scored in %.1f s", scoring_start - start, time.time() - scoring_start)
    if entries is None:
        return None
    return {
        "tasks": entries,
        "model": config.to_dict()["model"],
        "adapter": None if adapter is None else {"path": os.path.abspath(adapter_dir), "config": adapter.to_dict()},
        "layout": {"tp": groups.tp, "dp": groups.dp, "ep": groups.ep},
        "max_len": config.data.seq_len,
        "wall_s": round(time.time() - start, 2),
    }


def evaluate_from_config(config_path: str, overrides: list, adapter_dir: Optional[str] = None,
                         task_specs: Optional[list] = None, limit: Optional[int] = None,
                         row_tokens: int = ROW_TOKENS, rows_per_batch: int = ROWS_PER_BATCH) -> Optional[dict]:
    """Start the process group this launch describes, score, stop it; rank 0 returns the report.

    ``task_specs``: ``NAME=PATH[:STYLE|:FORMAT]`` strings instead of the config's tasks. Bad input
    (a flag, the config, the adapter directory, the launch environment) raises ``ValueError``
    before any process group starts.
    """
    for flag, value in (("--limit", limit), ("--row-tokens", row_tokens), ("--rows-per-batch", rows_per_batch)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    task_configs = task_configs_from_specs(task_specs) if task_specs else None
    config, _, _ = serving_config(config_path, overrides, adapter_dir)
    init_distributed(config.parallel.timeout_s)
    try:
        return evaluate_run(config, task_configs, adapter_dir, limit, row_tokens, rows_per_batch)
    finally:
        shutdown_distributed()
