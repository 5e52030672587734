"""Where expert parallelism beats replicated experts: one MoE layer on 2 processes, measured against
the placement cost model (``malora_dist.parallel.placement``).

    python benchmarks/crossover.py            # SmolLM2's q_proj shape (576×576), ~2 min on 2 CPU cores
    python benchmarks/crossover.py --quick    # tiny grid (tests)

For every cell of the grid (tokens per rank × number of experts) and method (MALoRA with d=32, r̄=12
fixed, so that only N varies; MoLoRA r=8), the same layer is built twice from one seed and laid out
with ``build_adapters``: ``ep`` (experts split over the 2 ranks, tokens exchanged by
all-to-all, sparse kernel) and ``replicate`` (all experts on both ranks, dense kernel, expert
gradients all-reduced). One step = forward, backward (input requiring grad, as inside a network),
the gradient reduction of ``malora_dist.parallel.gradients`` and the AdamW step of training.
The placements alternate round by round (the order flips each round); medians and spread of rank 0's
wall times are reported (and its process CPU time, which leaves out waiting for the other rank). The
step, the rounds and their statistics are ``benchmarks/layer_step.py``'s (shared with ``layer_speed.py``).

The prediction is ``placement_costs`` with the link and compute rates measured by ``measure_link``
at start-up (as ``auto`` does in training) and the cost terms the layer's parts report (the
exchange's collectives and bytes, each kernel's ops, bytes and FLOPs counted from its own code), so
the measured difference
(ep − replicate step time) is set against the predicted difference (exchange − replicate seconds),
and the winner of each against the other.

Output: ``<output-dir>/<name>.json`` and ``<name>.png`` (measured and predicted differences).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import operator
import os
import statistics
import sys
import time

import throughput
import torch
from layer_step import PHASES, paired, run_rounds, spread, step_s, time_step
from throughput import machine_info, run_world

METHODS = {
    "malora": dict(method="malora", rank=8, shared_dim=32, expert_rank=12, top_k=2),
    "molora": dict(method="molora", rank=8, top_k=2),
}


def _layer(adapter, num_experts, n, m, device, groups=None, placement="replicate"):
    """The layer of one cell, built for ``placement`` on ``groups`` (one process if None)."""
    import torch.nn as nn

    from malora_dist.config.adapter import AdapterConfig
    from malora_dist.parallel.parallelize import build_adapters
    from malora_dist.runtime.groups import ParallelGroups

    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(n, m, bias=False).to(device)})
    config = AdapterConfig(**adapter, num_experts=num_experts, target_modules=["proj"])
    build_adapters(model, config, groups or ParallelGroups.single(), placement)
    with torch.no_grad():
        model["proj"].expert_up.normal_(0, 0.01)  # B̄ = 0 at init: make the up-projections do real work
    return model


def crossover_world(spec: dict) -> dict:
    import torch.distributed as dist

    from malora_dist.adapters.inject import adapter_parameters
    from malora_dist.config.adapter import AdapterConfig
    from malora_dist.parallel.gradients import reduce_gradients
    from malora_dist.parallel.placement import measure_link, placement_costs
    from malora_dist.runtime.distributed import pick_backend_and_device
    from malora_dist.runtime.groups import ParallelGroups
    from malora_dist.train.optim import build_optimizer

    _, device = pick_backend_and_device(int(os.environ.get("LOCAL_RANK", "0")))
    groups = ParallelGroups.build(tp=1, ep=dist.get_world_size())
    link = measure_link(groups.ep_group, device)
    n, m = spec["n"], spec["m"]
    cells = []
    for method in spec["methods"]:
        for num_experts in spec["experts"]:
            for tokens in spec["tokens"]:
                adapter = METHODS[method]
                predicted = placement_costs(AdapterConfig(**adapter, num_experts=num_experts), n, m, tokens,
                                            groups.dp, groups.ep, link)
                runs = {}
                for placement in ("ep", "replicate"):
                    model = _layer(adapter, num_experts, n, m, device, groups, placement)
                    params = adapter_parameters(model)
                    runs[placement] = (model["proj"], build_optimizer(params, lr=1e-4, weight_decay=0.0), params)
                gen = torch.Generator().manual_seed(1000 + groups.dp_rank)
                x = torch.randn(tokens, n, generator=gen).to(device).requires_grad_()
                grad = torch.randn(tokens, m, generator=gen).to(device)
                steps = {}
                for placement, (layer, optimizer, params) in runs.items():
                    reduce = functools.partial(reduce_gradients, params, groups)
                    steps[placement] = functools.partial(time_step, layer, x, grad, optimizer, reduce)
                # the order flips each round (rotated by one of two)
                samples = run_rounds(steps, spec["warmup"], spec["repeats"], rotate=True)
                cells.append({"method": method, "num_experts": num_experts, "tokens_per_rank": tokens,
                              "predicted": {"exchange_s": predicted.exchange_s, "replicate_s": predicted.replicate_s,
                                            "choice": predicted.choice,
                                            "exchange_terms": dataclasses.asdict(predicted.exchange_terms),
                                            "replicate_terms": dataclasses.asdict(predicted.replicate_terms)},
                              "samples": samples})
    link_end = measure_link(groups.ep_group, device)
    return {"link_start": dataclasses.asdict(link), "link_end": dataclasses.asdict(link_end),
            "threads": torch.get_num_threads(), "device": str(device), "cells": cells}


def summarize(rank0: dict) -> list:
    rows = []
    for cell in rank0["cells"]:
        measured = {}
        for placement, samples in cell["samples"].items():
            measured[placement] = {"step_s": spread([step_s(s) for s in samples], count=True),
                                   **{k: statistics.median(s[k] for s in samples) for k in PHASES + ("cpu_s",)}}
        ep, rep = measured["ep"]["step_s"]["median"], measured["replicate"]["step_s"]["median"]
        ep_steps, replicate_steps = ([step_s(s) for s in cell["samples"][p]] for p in ("ep", "replicate"))
        pred = cell["predicted"]
        rows.append({
            "method": cell["method"], "num_experts": cell["num_experts"], "tokens_per_rank": cell["tokens_per_rank"],
            "measured": measured,
            "measured_ep_minus_replicate_s": paired(ep_steps, replicate_steps, operator.sub, count=True),
            "measured_choice": "replicate" if rep <= ep else "ep",
            "predicted": pred,
            "predicted_ep_minus_replicate_s": pred["exchange_s"] - pred["replicate_s"],
            "agree": (rep <= ep) == (pred["choice"] == "replicate"),
        })
    return rows


def plot(result: dict, path: str) -> bool:
    plt = throughput._pyplot()
    if plt is None:
        return False
    from matplotlib.colors import SymLogNorm

    rows = result["cells"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    experts = sorted({r["num_experts"] for r in rows})
    tokens = sorted({r["tokens_per_rank"] for r in rows})
    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 3.6 * len(methods)), squeeze=False)
    values = [1e3 * r["measured_ep_minus_replicate_s"]["median"] for r in rows] + \
             [1e3 * r["predicted_ep_minus_replicate_s"] for r in rows]
    vmax = max(max(abs(v) for v in values), 1e-3)
    norm = SymLogNorm(linthresh=max(vmax / 100, 0.01), vmin=-vmax, vmax=vmax)
    for row_axes, method in zip(axes, methods):
        cells = {(r["num_experts"], r["tokens_per_rank"]): r for r in rows if r["method"] == method}
        for ax, key, title in ((row_axes[0], "measured", "measured"), (row_axes[1], "predicted", "cost model")):
            grid = [[1e3 * (cells[(e, t)]["measured_ep_minus_replicate_s"]["median"] if key == "measured"
                            else cells[(e, t)]["predicted_ep_minus_replicate_s"]) for e in experts] for t in tokens]
            image = ax.imshow(grid, cmap="coolwarm", norm=norm, origin="lower", aspect="auto")
            for i, t in enumerate(tokens):
                for j, e in enumerate(experts):
                    cell = cells[(e, t)]
                    choice = cell["measured_choice"] if key == "measured" else cell["predicted"]["choice"]
                    mark = "" if cell["agree"] else " ✗"
                    ax.text(j, i, f"{grid[i][j]:+.1f}\n{'R' if choice == 'replicate' else 'EP'}{mark}",
                            ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(experts)), experts)
            ax.set_yticks(range(len(tokens)), tokens)
            ax.set_xlabel("experts N")
            ax.set_ylabel("tokens per rank")
            ax.set_title(f"{method}: {title} ep − replicate (ms/step)", fontsize=9)
            fig.colorbar(image, ax=ax, fraction=0.046)
    meta = result["meta"]
    link = result["link_start"]
    fig.text(0.01, 0.005, f"{meta['date']} · {meta['cpu_model'] or ''} · 2 processes × {result['threads']} thread(s) · "
             f"n={result['shape']['n']} m={result['shape']['m']} · link {link['latency_s'] * 1e3:.2f} ms, "
             f"{link['bytes_per_s'] / 1e9:.2f} GB/s, {link['flops_per_s'] / 1e9:.0f} GFLOP/s, "
             f"{link['op_s'] * 1e6:.0f} µs/op · red: replicate wins, blue: ep wins · ✗: model and measurement disagree",
             fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def markdown(result: dict) -> str:
    """The README table of a result file: per cell ep and replicate step times, measured and predicted
    differences, and the winner of each (✗ where they disagree)."""
    meta, link = result["meta"], result["link_start"]
    shared = " (above the core count: other jobs, or its own processes)" if meta.get("shared_machine") else ""
    lines = [f"`{meta['command']}` — {meta['date']}, {meta['cpu_model']}, 2 processes × {result['threads']} thread(s), "
             f"n={result['shape']['n']} m={result['shape']['m']}, load average {meta['load_average_start'][0]:.1f} → "
             f"{meta['load_average_end'][0]:.1f}{shared}; "
             f"link measured {link['latency_s'] * 1e3:.3f} ms, {link['bytes_per_s'] / 1e9:.2f} GB/s, "
             f"compute {link['flops_per_s'] / 1e9:.0f} GFLOP/s at a skinny matmul and {link['op_s'] * 1e6:.1f} µs per "
             f"small op, copies at {link['copy_bytes_per_s'] / 1e9:.1f} GB/s "
             f"(at the end: {result['link_end']['latency_s'] * 1e3:.3f} ms). Model and measurement agree on "
             f"{result['agreement']:.0%} of the cells.", "",
             "| method | N | tokens/rank | ep ms | replicate ms | measured ep − rep ms | predicted ep − rep ms "
             "| faster (measured / predicted) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["cells"]:
        ep_ms, replicate_ms = (1e3 * r["measured"][p]["step_s"]["median"] for p in ("ep", "replicate"))
        lines.append(f"| {r['method']} | {r['num_experts']} | {r['tokens_per_rank']} | "
                     f"{ep_ms:.1f} | {replicate_ms:.1f} | "
                     f"{1e3 * r['measured_ep_minus_replicate_s']['median']:+.1f} | "
                     f"{1e3 * r['predicted_ep_minus_replicate_s']:+.2f} | "
                     f"{r['measured_choice']} / {r['predicted']['choice']}{'' if r['agree'] else ' ✗'} |")
    return "\n".join(lines)


def _ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--methods", help="comma list of malora, molora")
    parser.add_argument("--tokens", help="tokens per rank, comma list")
    parser.add_argument("--experts", help="numbers of experts, comma list (even: ep=2 splits them)")
    parser.add_argument("--n", type=int)
    parser.add_argument("--m", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / 2)")
    parser.add_argument("--output-dir", default=os.path.join(throughput.HERE, "results"))
    parser.add_argument("--name")
    parser.add_argument("--markdown-from", metavar="JSON", help="print the README table of a result file and exit")
    args = parser.parse_args(argv)
    if throughput.print_markdown_from(args, markdown):
        return None
    defaults = dict(methods="malora" if args.quick else "malora,molora",
                    tokens="16,64" if args.quick else "16,128,1024",
                    experts="4,8" if args.quick else "4,8,16,32,64,128,256", n=64 if args.quick else 576,
                    m=64 if args.quick else 576, warmup=1 if args.quick else 2, repeats=2 if args.quick else 7,
                    name="crossover_quick" if args.quick else "crossover")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        sys.exit("crossover needs 2 GPUs when CUDA is present (one process per GPU)")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    spec = {"methods": methods, "tokens": _ints(args.tokens), "experts": _ints(args.experts), "n": args.n, "m": args.m,
            "warmup": args.warmup, "repeats": args.repeats}
    threads = args.threads or max(1, (os.cpu_count() or 1) // 2)
    started = time.perf_counter()
    meta = machine_info()
    ranks = run_world(2, threads, crossover_world, spec)
    meta["load_average_end"] = list(os.getloadavg())
    meta["elapsed_s"] = time.perf_counter() - started
    meta["shared_machine"] = max(meta["load_average_start"][0], meta["load_average_end"][0]) > (os.cpu_count() or 1)
    lead = ranks[0]
    result = {"meta": meta, "shape": {"n": args.n, "m": args.m, "dtype": "float32"}, "spec": spec, "processes": 2,
              "threads": lead["threads"], "device": lead["device"], "link_start": lead["link_start"],
              "link_end": lead["link_end"], "cells": summarize(lead)}
    result["agreement"] = sum(r["agree"] for r in result["cells"]) / max(len(result["cells"]), 1)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, args.name)
    result["plots"] = [os.path.basename(stem + ".png")] if plot(result, stem + ".png") else []
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    link = result["link_start"]
    print(f"2 processes × {result['threads']} thread(s), n={args.n} m={args.m}; link {link['latency_s'] * 1e3:.3f} ms, "
          f"{link['bytes_per_s'] / 1e9:.2f} GB/s, {link['flops_per_s'] / 1e9:.0f} GFLOP/s, "
          f"{link['op_s'] * 1e6:.1f} µs/op, copy {link['copy_bytes_per_s'] / 1e9:.1f} GB/s "
          f"(end: {result['link_end']['latency_s'] * 1e3:.3f} ms)")
    print(f"  {'method':7s} {'N':>3s} {'T':>5s} {'ep ms':>8s} {'rep ms':>8s} {'meas Δ':>8s} {'pred Δ':>8s}  "
          "measured / predicted")
    for r in result["cells"]:
        ep_ms, replicate_ms = (1e3 * r["measured"][p]["step_s"]["median"] for p in ("ep", "replicate"))
        print(f"  {r['method']:7s} {r['num_experts']:3d} {r['tokens_per_rank']:5d} {ep_ms:8.2f} {replicate_ms:8.2f} "
              f"{1e3 * r['measured_ep_minus_replicate_s']['median']:+8.2f} "
              f"{1e3 * r['predicted_ep_minus_replicate_s']:+8.2f}  "
              f"{r['measured_choice']:9s} / {r['predicted']['choice']:9s}{'' if r['agree'] else '  ✗'}")
    print(f"agreement {result['agreement']:.0%}; wrote {stem}.json in {meta['elapsed_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
