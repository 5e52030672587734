"""What a trained mixture of adapters learned (the paper's Figs. 2 and 3): the CCA similarity of
its experts' subspaces, their singular values, routing by task and what training changed, per
layer and per projection type (``malora-analyze`` prints and plots them)."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

from malora_dist.analysis.delta import analyse_change, max_abs_change
from malora_dist.analysis.initial_state import initial_adapter_state, seed_for
from malora_dist.analysis.routing import routing_by_task
from malora_dist.analysis.subspaces import analyse_state
from malora_dist.config.run import load_run_config
from malora_dist.export.checkpoint import export_checkpoint
from malora_dist.parallel.adapter_files import WEIGHTS_NAME, read_adapter_state


def read_adapter(path: str) -> tuple[dict, object]:
    """(state, adapter config) of an adapter directory or of a checkpoint ``RUN/checkpoints/step_N``
    (exported through the run's own ``RUN/config.yaml``)."""
    if os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        return read_adapter_state(path)
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if not os.path.exists(run_config):
        raise ValueError(f"{path!r} is neither an adapter directory (no {WEIGHTS_NAME}) nor a checkpoint "
                         f"RUN/checkpoints/step_N with the run's RUN/config.yaml")
    with tempfile.TemporaryDirectory() as out:
        export_checkpoint(load_run_config(run_config), path, out)
        return read_adapter_state(out)


def analyse(path: str, routing_examples: int = 0, delta: bool = False, seed: Optional[int] = None) -> dict:
    """The analysis of one adapter; with ``delta`` also that of what training changed, from the
    step-0 values of ``seed`` (default: the seed of the adapter's run, ``RUN/config.yaml``)."""
    state, config = read_adapter(path)
    result = {"source": path, **analyse_state(state, config)}
    if delta:
        run_seed = seed_for(path, seed)
        initial = initial_adapter_state(state, config, run_seed)
        result["delta"] = {"seed": run_seed, "max_abs_change": max_abs_change(state, initial),
                           **analyse_change(state, initial, config)}
    if routing_examples:
        result["routing"] = routing_by_task(path, routing_examples)
    return result


def analyse_all(paths: list, routing_examples: int, delta: bool, seed: Optional[int], jobs: int) -> list:
    """``analyse`` of every path, in order; ``jobs`` > 1: that many at once, each in a spawned process
    (a fresh one, so a CUDA device or a process group of the parent is never inherited)."""
    arguments = [(path, routing_examples, delta, seed) for path in paths]
    if jobs == 1 or len(paths) == 1:
        return [analyse(*a) for a in arguments]

    with ProcessPoolExecutor(min(jobs, len(paths)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(analyse, *zip(*arguments)))


def summary(results: dict) -> dict:
    """The results without their per-layer detail (per projection type, routing means)."""
    def brief(result: dict) -> dict:
        out = {k: v for k, v in result.items() if k not in ("layers", "delta", "routing")}
        if result.get("delta"):
            out["delta"] = {k: v for k, v in result["delta"].items() if k != "layers"}
        if result.get("routing"):
            out["routing"] = {k: result["routing"][k] for k in ("examples_per_task", "mean_load", "mean_entropy",
                                                                 "mean_task_distance") if k in result["routing"]}
        return out
    return {"runs": {label: brief(r) for label, r in results.items()}}


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def tables(results: dict) -> str:
    """The per-projection tables in Markdown: the present values, the learned changes where
    analysed, routing where measured."""
    lines = ["| run | projection | CCA down (random) | CCA up (random) | eff. rank down | eff. rank up |",
             "|---|---|---|---|---|---|"]
    for label, result in results.items():
        for name, row in result["by_projection"].items():
            lines.append(f"| {label} | {name} | {_fmt(row['cca_down'])} ({_fmt(row['cca_down_random'])}) | "
                         f"{_fmt(row['cca_up'])} ({_fmt(row['cca_up_random'])}) | "
                         f"{row['effective_rank_down']:.1f} | {row['effective_rank_up']:.1f} |")
    changes = {label: r["delta"] for label, r in results.items() if r.get("delta")}
    if changes:
        lines += ["", "Learned change (trained − step 0, from the run's seed); ‖Δ‖/‖X⁰‖: the down side's change "
                  "relative to its start (the up side starts at zero); P_t: MALoRA's coefficients.", "",
                  "| run | projection | ΔCCA down (random) | ΔCCA up (random) | eff. rank Δdown | eff. rank Δup | "
                  "‖Δdown‖/‖down⁰‖ | ΔP_t CCA (random) | ‖ΔS_A‖/‖S_A⁰‖ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, change in changes.items():
            for name, row in change["by_projection"].items():
                lines.append(f"| {label} | {name} | {_fmt(row['cca_down'])} ({_fmt(row['cca_down_random'])}) | "
                             f"{_fmt(row['cca_up'])} ({_fmt(row['cca_up_random'])}) | "
                             f"{row['effective_rank_down']:.1f} | {row['effective_rank_up']:.1f} | "
                             f"{_fmt(row.get('change_down'))} | {_fmt(row.get('cca_coefficients'))} "
                             f"({_fmt(row.get('cca_coefficients_random'))}) | {_fmt(row.get('change_shared'))} |")
    routed = {label: r["routing"] for label, r in results.items() if r.get("routing")}
    if routed:
        lines += ["", "| run | task | load entropy (mean over layers) | mean load per expert |", "|---|---|---|---|"]
        for label, routing in routed.items():
            for task, entropy in routing["mean_entropy"].items():
                load = " ".join(f"{v:.2f}" for v in routing["mean_load"][task])
                lines.append(f"| {label} | {task} | {entropy:.3f} | {load} |")
            lines.append(f"| {label} | (between tasks) | mean total-variation distance "
                         f"{routing['mean_task_distance']:.3f} | |")
    return "\n".join(lines)

