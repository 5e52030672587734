"""Routing by task: which experts each task's tokens go to, layer by layer, from a held-out pass.

The trained adapter is loaded onto its run's base (one process, ``RUN/config.yaml`` beside
``RUN/adapter``), and each task's held-out examples (prompt and gold answer, as scored) run through
the model one at a time, so no padding is routed. Per task and adapted layer it reports the expert
load (the share of the top-k slots each expert receives) and the load's entropy normalised by
log N (1 = spread evenly over the N experts, 0 = one expert takes everything). Per layer it reports
how far the tasks' loads are apart: the mean pairwise total-variation distance between them (0 =
every task uses the experts alike; 1 = disjoint experts) — the paper's premise is that a mixture
routes different tasks to different experts.
"""

from __future__ import annotations

import math
import os
from itertools import combinations
from typing import Optional

import torch

from malora_dist.adapters.layer import AdapterLinear
from malora_dist.config.run import load_run_config
from malora_dist.evaluation.scoring import make_item
from malora_dist.evaluation.tasks import load_eval_tasks
from malora_dist.inference.model import build_eval_model, fit_eval_layout
from malora_dist.parallel.adapter_files import read_adapter_config
from malora_dist.runtime.distributed import init_distributed, shutdown_distributed
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.launch_env import resolve_launch_env
from malora_dist.train.build import load_run_tokenizer


def run_config_of(adapter_dir: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "config.yaml")
    if not os.path.exists(path):
        raise ValueError(f"routing by task needs the run's config beside the adapter ({path} is missing): "
                         f"analyse RUN/adapter of a training run")
    return path


def load_entropy(load: torch.Tensor) -> float:
    """Entropy of a load distribution over N experts, divided by log N (in [0, 1])."""
    p = load / load.sum().clamp(min=1)
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(load.numel())) if load.numel() > 1 else 0.0


def total_variation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(0.5 * (a / a.sum() - b / b.sum()).abs().sum())


def summarise(counts: dict) -> dict:
    """{task: {layer: slot counts}} → per task and layer the load and its entropy, per layer the mean
    pairwise total-variation distance between the tasks, and the means over layers."""
    tasks = list(counts)
    layers = list(next(iter(counts.values()))) if counts else []
    per_task = {
        task: {layer: {"slots": c.tolist(), "load": (c / c.sum().clamp(min=1)).tolist(), "entropy": load_entropy(c)}
               for layer, c in counts[task].items()}
        for task in tasks
    }
    distance = {layer: (sum(total_variation(counts[a][layer], counts[b][layer]) for a, b in combinations(tasks, 2))
                        / max(len(tasks) * (len(tasks) - 1) // 2, 1)) for layer in layers}
    mean_load = {task: torch.stack([counts[task][layer] / counts[task][layer].sum().clamp(min=1) for layer in layers])
                 .mean(0).tolist() for task in tasks}
    return {
        "tasks": per_task,
        "task_distance": distance,
        "mean_task_distance": sum(distance.values()) / max(len(distance), 1),
        "mean_entropy": {task: sum(e["entropy"] for e in per_task[task].values()) / max(len(layers), 1)
                         for task in tasks},
        "mean_load": mean_load,
    }


def count_routing(model, tasks, tokenizer, chat: bool, device: torch.device) -> dict:
    """{task: {layer name: top-k slots per expert}} over the tasks' examples."""
    routed = {name: m for name, m in model.named_modules()
              if isinstance(m, AdapterLinear) and m.config.is_moe}
    if not routed:
        return {}
    counts = {}
    chat_tokenizer = tokenizer if chat else None
    with torch.no_grad():
        for t, task in enumerate(tasks):
            totals = {name: torch.zeros(m.config.num_experts, dtype=torch.float64) for name, m in routed.items()}
            for i, example in enumerate(task.examples):
                item = make_item((t, i), example, task.style, task.metric, chat_tokenizer)
                ids = tokenizer(item.prompt + item.target, add_special_tokens=False)["input_ids"]
                model(torch.tensor([ids], device=device))
                for name, layer in routed.items():
                    totals[name] += layer.router_stats.slot_counts.double().cpu()
            counts[task.name] = totals
    return counts


def routing_by_task(adapter_dir: str, limit: Optional[int]) -> Optional[dict]:
    """The routing summary of ``adapter_dir`` on its run's held-out sets (the first ``limit`` examples
    of each task); None for an adapter without a router (LoRA). Runs in this one process."""
    adapter = read_adapter_config(adapter_dir)
    if not adapter.is_moe:
        return None
    config = load_run_config(run_config_of(adapter_dir))
    resolve_launch_env(os.environ)
    config = fit_eval_layout(config, 1, adapter, frozenset())
    device = init_distributed(config.parallel.timeout_s)
    try:
        groups = ParallelGroups.build(1, 1, adapter.num_experts)
        tokenizer = load_run_tokenizer(config.model)
        tasks = load_eval_tasks(config.data, tokenizer, config.train.seed, None, limit)
        model = build_eval_model(config, groups, device, adapter_dir)
        counts = count_routing(model, tasks, tokenizer, config.data.use_chat_template, device)
    finally:
        shutdown_distributed()
    return {"examples_per_task": {t.name: len(t.examples) for t in tasks}, **summarise(counts)}
