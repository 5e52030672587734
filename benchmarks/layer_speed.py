"""Forward+backward time of one adapted linear relative to the frozen base linear alone.

    python benchmarks/layer_speed.py [--n 2048 --m 2048 --tokens 2048 --repeats 10]

The input requires grad, so the base does its backward too (as inside a network). Methods are
interleaved round by round; the median and the spread (min–max) over rounds are reported, with the
thread count. Default methods are the paper's: LoRA r=64, MoLoRA r=8 N=8 top-2, MALoRA d=32 r̄=12.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn as nn

from malora_dist.adapters.config import AdapterConfig
from malora_dist.adapters.layer import AdapterLinear

PAPER_METHODS = {
    "lora-r64": dict(method="lora", rank=64),
    "molora-r8-sparse": dict(method="molora", rank=8, num_experts=8, top_k=2, expert_kernel="sparse"),
    "molora-r8-dense": dict(method="molora", rank=8, num_experts=8, top_k=2, expert_kernel="dense"),
    "malora-d32-r12-sparse": dict(method="malora", rank=8, num_experts=8, top_k=2, expert_kernel="sparse"),
    "malora-d32-r12-dense": dict(method="malora", rank=8, num_experts=8, top_k=2, expert_kernel="dense"),
}


def build(name, n, m):
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False)
    if name == "base":
        for p in base.parameters():
            p.requires_grad_(False)
        return base
    layer = AdapterLinear(base, AdapterConfig(**PAPER_METHODS[name]))
    with torch.no_grad():  # B̄ = 0 at init; give it values so nothing is trivially zero
        layer.expert_up.normal_(0, 0.01)
    return layer


def time_fwd_bwd(module, x, grad):
    start = time.perf_counter()
    out = module(x)
    out.backward(grad)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(PAPER_METHODS))
    parser.add_argument("--output", help="write the JSON result here")
    args = parser.parse_args(argv)

    names = ["base"] + args.methods
    modules = {name: build(name, args.n, args.m) for name in names}
    x = torch.randn(args.tokens, args.n, requires_grad=True)
    grad = torch.randn(args.tokens, args.m)
    times = {name: [] for name in names}
    for round_index in range(args.warmup + args.repeats):
        for name in names:  # interleaved, so drift of the machine hits every method alike
            x.grad = None
            elapsed = time_fwd_bwd(modules[name], x, grad)
            if round_index >= args.warmup:
                times[name].append(elapsed)
    base = statistics.median(times["base"])
    rows = {
        name: {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "ratio_to_base": statistics.median(t) / base,
        }
        for name, t in times.items()
    }
    result = {
        "shape": {"n": args.n, "m": args.m, "tokens": args.tokens, "dtype": "float32"},
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "results": rows,
    }
    print(f"fwd+bwd, n={args.n} m={args.m} tokens={args.tokens}, {result['threads']} threads, median of {args.repeats}")
    for name, row in rows.items():
        print(f"  {name:24s} {row['median_ms']:8.2f} ms  ({row['min_ms']:.2f}–{row['max_ms']:.2f})  ×{row['ratio_to_base']:.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
