"""Sweeps: a grid over config keys, each point trained and evaluated (and resumed) in its own
directory, the scores aggregated over seeds beside the paper's (``malora-sweep`` is the command)."""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import statistics
import subprocess

import yaml

from malora_dist.config.run import load_run_config
from malora_dist.evaluation.report import write_report
from malora_dist.evaluation.run import ROWS_PER_BATCH, evaluate_from_config
from malora_dist.train.run import train_from_config

SEED_KEY = "train.seed"
# The paper's Table 2 (intra-domain, LLaMA-2-7B, accuracy %), by method and the task names of this
# project's commonsense configs.
PAPER_INTRA = {
    "lora": {"piqa": 81.1, "openbookqa": 89.4, "boolq": 77.1, "arc_challenge": 64.5, "arc_easy": 80.5},
    "molora": {"piqa": 80.3, "openbookqa": 90.4, "boolq": 79.3, "arc_challenge": 66.1, "arc_easy": 82.4},
    "malora": {"piqa": 81.8, "openbookqa": 89.6, "boolq": 81.6, "arc_challenge": 66.6, "arc_easy": 82.8},
}


LINK = "/"


def parse_grid(specs: list[str]) -> dict:
    """``KEY=V1,V2,...`` (values parsed as YAML) → {key: [values]}, in the given order. Linked keys
    vary together: ``adapter.method/adapter.rank=lora/32,molora/8`` gives two points, not four (a
    baseline at its own rank for a comparable parameter budget); each value is then a list."""
    grid = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        keys = key.split(LINK)
        if not sep or not all("." in k for k in keys) or not values:
            raise ValueError(f"--grid {spec!r} must look like section.key=value1,value2 "
                             f"(or section.a{LINK}section.b=a1{LINK}b1,a2{LINK}b2 for linked keys)")
        if key in grid or any(k in swept_keys(grid) for k in keys):
            raise ValueError(f"--grid names {key} twice: give all its values in one --grid")
        parsed = []
        for value in values.split(","):
            parts = value.split(LINK) if len(keys) > 1 else [value]
            if len(parts) != len(keys):
                raise ValueError(f"--grid {spec!r}: value {value!r} must give {len(keys)} parts joined by {LINK!r}, "
                                 f"one per key of {key}")
            items = [yaml.safe_load(v) for v in parts]
            parsed.append(items if len(keys) > 1 else items[0])
        grid[key] = parsed
    return grid


def swept_keys(grid: dict) -> list[str]:
    """The config keys a grid sets, linked keys split apart."""
    return [k for key in grid for k in key.split(LINK)]


def point_name(values: dict) -> str:
    return "_".join(f"{key.split('.')[-1]}-{re.sub(r'[^A-Za-z0-9.+-]', '', str(v))}" for key, v in values.items())


def expand(grid: dict) -> list[dict]:
    """Every combination, in grid order, with a directory name made of its values."""
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = {}
        for key, value in zip(keys, combo):
            linked = key.split(LINK)
            values.update(zip(linked, value) if len(linked) > 1 else [(key, value)])
        points.append({"index": len(points), "name": point_name(values), "values": values})
    return points


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def point_overrides(spec: dict, point: dict, out: str) -> list[str]:
    run_dir = os.path.join(out, "points", point["name"], "run")
    overrides = list(spec["set"]) + [f"{k}={_yaml_value(v)}" for k, v in point["values"].items()]
    return overrides + [f"train.output_dir={run_dir}", "checkpoint.resume=auto"]


def _launch(spec: dict, command: str, *args: str) -> list[str]:
    """``malora_dist.commands.<command>`` under the sweep's launcher (torchrun, srun, python)."""
    return shlex.split(spec["launcher"]) + ["-m", f"malora_dist.commands.{command}", *args]


def run_point(spec: dict, point: dict, out: str, train_only: bool = False) -> None:
    """Train (or continue) and evaluate one point; done when its eval.json exists. Without a
    launcher both run in this process (one process per point would spend most of a small sweep
    starting Python); with one, each is its own launch. ``train_only``: stop once the point's
    adapter is written (for analyses of the adapters of a sweep whose table already exists)."""
    directory = os.path.join(out, "points", point["name"])
    result = os.path.join(directory, "eval.json")
    if os.path.exists(result) or (train_only and os.path.isdir(os.path.join(directory, "run", "adapter"))):
        return
    overrides = point_overrides(spec, point, out)
    run_dir = os.path.join(directory, "run")
    config, adapter = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "adapter")
    rows_per_batch = spec.get("rows_per_batch")  # wider forward passes: fewer launches on a GPU, the same scores
    if spec["launcher"]:
        sets = [a for o in overrides for a in ("--set", o)]
        subprocess.run(_launch(spec, "train", "--config", spec["config"], *sets), check=True)
        if train_only:
            return
        evaluate = ["--config", config, "--adapter", adapter, "--output", result + ".tmp"]
        evaluate += ["--limit", str(spec["eval_limit"])] if spec.get("eval_limit") else []
        evaluate += ["--rows-per-batch", str(rows_per_batch)] if rows_per_batch else []
        subprocess.run(_launch(spec, "evaluate", *evaluate), check=True)
    else:
        train_from_config(spec["config"], overrides)
        if train_only:
            return
        report = evaluate_from_config(config, [], adapter, limit=spec.get("eval_limit"),
                                      rows_per_batch=rows_per_batch or ROWS_PER_BATCH)
        write_report(report, result + ".tmp")
    os.replace(result + ".tmp", result)  # written whole, so a half-done evaluation is re-run


def aggregate(spec: dict, out: str) -> dict:
    """Per group of points that differ only in the seed: per task mean ± sd of accuracy over seeds."""
    groups: dict = {}
    for point in spec["points"]:
        path = os.path.join(out, "points", point["name"], "eval.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            tasks = json.load(f)["tasks"]
        key = tuple((k, v) for k, v in point["values"].items() if k != SEED_KEY)
        group = groups.setdefault(key, {"values": dict(key), "seeds": [], "tasks": {}})
        group["seeds"].append(point["values"].get(SEED_KEY))
        # ROUGE-L for rouge_l tasks; reports written before the metric key carry their accuracy only
        accuracies = {name: entry.get("score", entry.get("accuracy")) for name, entry in tasks.items()}
        accuracies["mean"] = sum(accuracies.values()) / len(accuracies)
        for name, accuracy in accuracies.items():
            group["tasks"].setdefault(name, []).append(accuracy)
    rows = []
    for group in groups.values():
        method = group["values"].get("adapter.method", _base_method(spec))
        cells = {}
        for task, values in group["tasks"].items():
            paper = PAPER_INTRA.get(method, {}).get(task)
            cells[task] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "n": len(values), "paper": paper}
        rows.append({"values": group["values"], "seeds": group["seeds"], "tasks": cells})
    return {"grid": spec["grid"], "rows": rows, "done": sum(len(r["seeds"]) for r in rows),
            "points": len(spec["points"])}


def _base_method(spec: dict) -> str:
    with open(spec["config"]) as f:
        return (yaml.safe_load(f).get("adapter") or {}).get("method", "malora")


def markdown(results: dict) -> str:
    tasks = sorted({t for row in results["rows"] for t in row["tasks"] if t != "mean"}) + ["mean"]
    keys = [k for k in swept_keys(results["grid"]) if k != SEED_KEY]
    head = "| " + " | ".join([k.split(".")[-1] for k in keys] + ["seeds"] + tasks) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1 + len(tasks))]
    for row in results["rows"]:
        cells = []
        for task in tasks:
            cell = row["tasks"].get(task)
            text = "–" if cell is None else f"{100 * cell['mean']:.1f} ± {100 * cell['sd']:.1f}"
            if cell is not None and cell["paper"] is not None:
                text += f" (paper {cell['paper']:.1f})"
            cells.append(text)
        lines.append("| " + " | ".join([str(row["values"][k]) for k in keys] + [str(len(row["seeds"]))] + cells) + " |")
    lines.append(f"\n{results['done']} of {results['points']} points done; accuracy % (mean ± sd over seeds); the "
                 f"paper's numbers are LLaMA-2-7B's (Table 2), for orientation.")
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = sorted({t for row in results["rows"] for t in row["tasks"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(tasks)), 4))
    width = 0.8 / max(len(results["rows"]), 1)
    for i, row in enumerate(results["rows"]):
        means = [100 * row["tasks"].get(t, {"mean": float("nan")})["mean"] for t in tasks]
        sds = [100 * row["tasks"].get(t, {"sd": 0.0})["sd"] for t in tasks]
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in row["values"].items())
        ax.bar([x + i * width for x in range(len(tasks))], means, width, yerr=sds, label=label, capsize=3)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy % (mean ± sd over seeds)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_table(spec: dict, out: str) -> dict:
    results = aggregate(spec, out)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    text = markdown(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    results["plot"] = plot(results, os.path.join(out, "results.png"))
    print(text)
    return results


def load_or_create(args) -> dict:
    """The sweep's spec: read from ``OUT/sweep.json``, or written there from the arguments."""
    path = os.path.join(args.out, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            spec = json.load(f)
        given = {"config": args.config and os.path.abspath(args.config), "grid": args.grid and parse_grid(args.grid)}
        clashing = [k for k, v in given.items() if v and v != spec[k]]
        if clashing:
            raise ValueError(f"{path} holds a sweep with another {', '.join(clashing)}: pass a new --out, or "
                             f"run without --config/--grid to resume the existing sweep")
        return spec
    if not args.config or not args.grid:
        raise ValueError(f"no sweep in {args.out!r} yet: pass --config and at least one --grid to start one")
    grid = parse_grid(args.grid)
    spec = {"config": os.path.abspath(args.config), "grid": grid, "set": args.set, "launcher": args.launcher,
            "eval_limit": args.eval_limit, "rows_per_batch": args.rows_per_batch, "points": expand(grid)}
    for point in spec["points"]:  # every point's config must be valid before the first one trains
        load_run_config(spec["config"], point_overrides(spec, point, args.out))
    os.makedirs(args.out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(spec, f, indent=1)
    os.replace(path + ".tmp", path)
    return spec


