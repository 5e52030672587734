"""Training steps with the experts split over 2 processes (ep=2): the distributed path before and after
its kernels and exchanges were merged, and the placements, side by side in one run.

    python benchmarks/ep_step.py                 # SmolLM2-135M (GGUF) on CPU, 2 processes × 1 thread
    python benchmarks/ep_step.py --quick         # a tiny random model (tests, smoke runs)

Variants (MALoRA d=32 r̄=12 and MoLoRA r=8, N=8, top-2, on q, k, v, o, gate, up, down):

- ``before``: the reference parts, each adapted linear with its own exchange (5 collectives and 1
  host read each per micro-batch);
- ``siblings``: reference parts, q/k/v and gate/up sharing one exchange (``parallel.share_exchanges``);
- ``fused``: the fused routing and grouped-experts Functions, one exchange per layer;
- ``fused+siblings``: both (the default, ``adapter.kernel: auto``);
- ``replicate`` and ``auto`` placements (the default kernel and exchanges).

Measured through ``benchmarks/throughput.py``'s harness: every variant's adapters on one shared
frozen base, the variants taking turns step by step (the order rotates each round), so that a
shared machine's drift hits all of them alike. Reported per variant: the median step time, its
ratio to ``before`` paired round by round (wall, and rank 0's process CPU time, which is steadier on
a busy machine and blind to waiting), and per step the exchanges' collectives and host reads and
the all-to-all bytes (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import throughput

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {"malora": throughput.PAPER["malora-d32-r12"], "molora": throughput.PAPER["molora-r8"]}
EXCHANGE_VARIANTS = {  # name → (adapter.kernel, parallel.share_exchanges)
    "before": ("reference", False),
    "siblings": ("reference", True),
    "fused": ("auto", False),
    "fused+siblings": ("auto", True),
}


def variants(methods: list) -> list:
    out = [("base", None, "ep")]
    for method in methods:
        adapter = METHODS[method]
        for name, (kernel, share) in EXCHANGE_VARIANTS.items():
            if method != "malora" and name in ("siblings", "fused"):
                continue  # the two steps in between, for one method
            out.append((f"{method} {name}", dict(adapter, kernel=kernel, share_exchanges=share), "ep"))
        if method == "malora":
            out += [(f"{method} {p}", dict(adapter), p) for p in ("replicate", "auto")]
    return out


def summarize(ranks: list, warmup: int) -> dict:
    world = throughput.summarize_world(ranks, warmup)
    lead = ranks[0]["variants"]
    rows = {}
    for name, row in world["variants"].items():
        timed = [s for s in lead[name]["samples"] if s["round"] >= warmup]
        out = {"step_s": row["step_s"]["median"], "cpu_s": row["cpu_s"]["median"],
               "a2a_collectives": statistics.median(s.get("a2a_collectives", 0) for s in timed),
               "a2a_host_reads": statistics.median(s.get("a2a_host_reads", 0) for s in timed),
               "a2a_bytes": row["a2a_bytes_rank0"]["median"] if row.get("a2a_bytes_rank0") else 0,
               "layers_ep": row.get("layers_ep"), "layers_replicated": row.get("layers_replicated")}
        method = name.split(" ")[0]
        before = world["variants"].get(f"{method} before")
        if before is not None and name != "base":
            paired = throughput._paired_ratio(row, before)  # this variant's tokens/s over before's, round by round
            out["speedup_wall"] = paired["per_round"]["median"]
            out["speedup_cpu"] = paired["cpu_time_ratio"]
        rows[name] = out
    return {"processes": world["processes"], "threads_per_process": world["threads_per_process"], "variants": rows}


def print_table(result: dict) -> None:
    print(f"\n{result['model']}, {result['processes']} processes × {result['threads_per_process']} thread, ep=2, "
          f"seq {result['seq_len']}, global batch {result['global_batch']} (micro {result['micro_batch']})")
    print("| variant | step s | speed-up vs before (wall) | (CPU time) | collectives / step | host reads / step "
          "| a2a MB / step |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result["variants"].items():
        wall = f"×{r['speedup_wall']:.2f}" if "speedup_wall" in r else "—"
        cpu = f"×{r['speedup_cpu']:.2f}" if "speedup_cpu" in r else "—"
        print(f"| {name} | {r['step_s']:.3f} | {wall} | {cpu} | {r['a2a_collectives']:.0f} | "
              f"{r['a2a_host_reads']:.0f} | {r['a2a_bytes'] / 2**20:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny random model, 2 timed rounds")
    parser.add_argument("--methods", default="malora,molora", help="comma list of malora, molora")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--repeats", type=int, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", help="write the JSON result here")
    args = parser.parse_args(argv)
    model = "tiny" if args.quick else "smollm2"
    seq_len = args.seq_len or (32 if args.quick else 64)
    repeats = args.repeats or (2 if args.quick else 5)
    spec = {"model": {**throughput.model_section(model), "dtype": "float32"}, "seq_len": seq_len,
            "global_batch_size": 4, "micro_batch_size": 2, "data_limit": 240, "steps": args.warmup + repeats,
            "profile": False, "profile_top": 0, "variants": variants([m for m in args.methods.split(",") if m])}
    meta = throughput.machine_info()  # its load average is the one at the start
    ranks = throughput.run_world(2, 1, throughput.train_world, spec)
    result = {"model": model, "seq_len": seq_len, "global_batch": 4, "micro_batch": 2, "meta": meta,
              **summarize(ranks, args.warmup)}
    result["meta"]["load_average_end"] = list(os.getloadavg())
    print_table(result)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
