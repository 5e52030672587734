"""Forward+backward time of one adapted linear relative to the frozen base linear alone.

    python benchmarks/layer_speed.py [--n 2048 --m 2048 --tokens 2048 --repeats 10]
    python benchmarks/layer_speed.py --device cuda --dtype bfloat16 --n 4096 --m 4096 --tokens 16384

The input requires grad, so the base does its backward too (as inside a network). Methods are
interleaved round by round; the median and the spread (min–max) over rounds are reported, with the
thread count. Default methods are the paper's: LoRA r=64, MoLoRA r=8 N=8 top-2, MALoRA d=32 r̄=12.

Each round times the forward, the backward and the optimizer step (AdamW as in training,
``malora_dist.train.optim.build_optimizer``) separately; ``ratio_to_base`` is forward+backward over
the base's forward+backward, the number the design targets (``cpu_ratio_to_base``: the same from the
process CPU time, which a shared machine disturbs less). ``saved_mb`` is what autograd keeps for
the backward (parameters excluded), from one extra untimed pass. The step, the rounds and their
statistics are ``benchmarks/layer_step.py``'s (shared with ``crossover.py``). ``benchmarks/throughput.py``
calls ``measure`` with its own method list.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics

import torch
import torch.nn as nn
from layer_step import fwd_bwd_s, paired, run_rounds, spread, step_s, time_step

from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.layout import AdapterLayout
from malora_dist.config.adapter import AdapterConfig
from malora_dist.train.optim import build_optimizer

PAPER_METHODS = {
    "lora-r64": dict(method="lora", rank=64, kernel="fused"),
    "lora-r64-ref": dict(method="lora", rank=64, kernel="reference"),
    "molora-r8-sparse": dict(method="molora", rank=8, num_experts=8, top_k=2, expert_kernel="sparse", kernel="fused"),
    "molora-r8-sparse-ref": dict(method="molora", rank=8, num_experts=8, top_k=2, expert_kernel="sparse",
                                 kernel="reference"),
    "molora-r8-dense": dict(method="molora", rank=8, num_experts=8, top_k=2, expert_kernel="dense", kernel="fused"),
    "molora-r8-dense-ref": dict(method="molora", rank=8, num_experts=8, top_k=2, expert_kernel="dense",
                                kernel="reference"),
    "malora-d32-r12-sparse": dict(method="malora", rank=8, num_experts=8, top_k=2, expert_kernel="sparse",
                                  kernel="fused"),
    "malora-d32-r12-sparse-ref": dict(method="malora", rank=8, num_experts=8, top_k=2, expert_kernel="sparse",
                                      kernel="reference"),
    "malora-d32-r12-dense": dict(method="malora", rank=8, num_experts=8, top_k=2, expert_kernel="dense",
                                 kernel="fused"),
    "malora-d32-r12-dense-ref": dict(method="malora", rank=8, num_experts=8, top_k=2, expert_kernel="dense",
                                     kernel="reference"),
}
# The fused kernel (adapter.kernel=fused, the default ``auto`` picks it for these) against the
# reference parts (``-ref``) of the same configuration. ``sparse``: rows grouped per expert, the path
# of experts split over ranks (the fused routing and grouped-experts Functions).


def build(adapter, n, m, device="cpu", dtype=torch.float32):
    """The frozen base linear (``adapter`` None) or an AdapterLinear around it. An ``ep`` entry in
    ``adapter`` builds this rank's share of experts split over that many ranks, with the exchange's
    local steps and no communication (its collectives are counted apart: ``ep_traffic.py``)."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=False).to(device=device, dtype=dtype)
    if adapter is None:
        for p in base.parameters():
            p.requires_grad_(False)
        return base
    adapter = dict(adapter)
    ep = adapter.pop("ep", 1)
    layout = AdapterLayout(ep_size=ep) if ep > 1 else AdapterLayout()
    layer = AdapterLinear(base, AdapterConfig(**adapter), layout=layout)
    with torch.no_grad():  # B̄ = 0 at init; give it values so nothing is trivially zero
        layer.expert_up.normal_(0, 0.01)
    return layer


def trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def saved_for_backward_mb(module, x, grad):
    """MB of tensors autograd saves for the backward of one step, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    out.backward(grad)
    for p in module.parameters():
        p.grad = None
    return sum(seen.values()) / 2**20


def profile_step(module, optimizer, x, grad, top=12):
    """One step under torch.profiler: the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        time_step(module, x, grad, optimizer)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3} for e in events[:top]]


def measure(methods, n=2048, m=2048, tokens=2048, repeats=10, warmup=3, device="cpu", dtype=torch.float32,
            profile_top=0):
    """Time ``{"base": None, **methods}`` (name → AdapterConfig keys) round by round; return the rows
    (with the top ops of one profiled step each when ``profile_top`` > 0)."""
    names = ["base"] + [name for name in methods if name != "base"]
    adapters = {"base": None, **methods}
    modules = {name: build(adapters[name], n, m, device, dtype) for name in names}
    optimizers = {name: build_optimizer(trainable(mod), lr=1e-4, weight_decay=0.0) if trainable(mod) else None
                  for name, mod in modules.items()}
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, m, device=device, dtype=dtype)
    # interleaved, so drift of the machine hits every method alike
    times = run_rounds({name: functools.partial(time_step, modules[name], x, grad, optimizers[name]) for name in names},
                       warmup, repeats)
    saved, profiles = {}, {}
    for name in names:
        x.grad = None
        saved[name] = saved_for_backward_mb(modules[name], x, grad)
        if profile_top:
            x.grad = None
            profiles[name] = profile_step(modules[name], optimizers[name], x, grad, profile_top)
    fwd_bwd = {name: [fwd_bwd_s(s) for s in t] for name, t in times.items()}
    cpu = {name: [s["fwd_bwd_cpu_s"] for s in t] for name, t in times.items()}
    base = statistics.median(fwd_bwd["base"])
    rows = {}
    for name, t in times.items():
        step = [step_s(s) for s in t]
        rows[name] = {
            "adapter": adapters[name],
            "forward_ms": spread([s["forward_s"] for s in t], 1e3),
            "backward_ms": spread([s["backward_s"] for s in t], 1e3),
            "optimizer_ms": spread([s["optimizer_s"] for s in t], 1e3),
            "fwd_bwd_ms": spread(fwd_bwd[name], 1e3),
            "step_ms": spread(step, 1e3),
            # the old keys of this script (forward+backward), kept for readers of older JSON
            "median_ms": 1e3 * statistics.median(fwd_bwd[name]),
            "min_ms": 1e3 * min(fwd_bwd[name]),
            "max_ms": 1e3 * max(fwd_bwd[name]),
            "ratio_to_base": statistics.median(fwd_bwd[name]) / base,
            # per-round ratios against the base of the same round: robust to slow drift of the machine
            "paired_ratio": paired(fwd_bwd[name], fwd_bwd["base"]),
            "overhead_ms": 1e3 * (statistics.median(fwd_bwd[name]) - base),
            "fwd_bwd_cpu_ms": spread(cpu[name], 1e3),
            "cpu_ratio_to_base": statistics.median(cpu[name]) / statistics.median(cpu["base"]),
            "tokens_per_s": tokens / statistics.median(step),
            "trainable_params": sum(p.numel() for p in trainable(modules[name])),
            "saved_mb": saved[name],
        }
        if profile_top:
            rows[name]["profile"] = profiles[name]
    return {
        "shape": {"n": n, "m": m, "tokens": tokens, "dtype": str(dtype).replace("torch.", "")},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "repeats": repeats,
        "warmup": warmup,
        "results": rows,
    }


def print_table(result):
    shape = result["shape"]
    print(f"one layer, n={shape['n']} m={shape['m']} tokens={shape['tokens']} {shape['dtype']}, "
          f"{result['threads']} threads, median of {result['repeats']} (min–max)")
    print(f"  {'':24s} {'fwd+bwd ms':>22s} {'×base':>6s} {'CPU ×base':>9s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s} "
          f"{'params':>9s} {'saved MB':>8s}")
    for name, row in result["results"].items():
        fb = row["fwd_bwd_ms"]
        print(f"  {name:24s} {fb['median']:8.2f} ({fb['min']:.1f}–{fb['max']:.1f}) {row['ratio_to_base']:6.3f} "
              f"{row['cpu_ratio_to_base']:9.3f} {row['forward_ms']['median']:7.2f} {row['backward_ms']['median']:7.2f} "
              f"{row['optimizer_ms']['median']:7.2f} {row['trainable_params']:9d} {row['saved_mb']:8.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--m", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(PAPER_METHODS), choices=list(PAPER_METHODS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP", help="profile one step per method: top ops")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the base linear and the input (default float32)")
    parser.add_argument("--output", help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    result = measure({name: PAPER_METHODS[name] for name in args.methods}, args.n, args.m, args.tokens,
                     args.repeats, args.warmup, device=args.device, dtype=getattr(torch, args.dtype),
                     profile_top=args.profile)
    print_table(result)
    for name, row in result["results"].items():
        for op in row.get("profile", []):
            print(f"    {name:24s} {op['op']:40s} {op['calls']:5d} calls {op['self_ms']:9.2f} ms self")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
