"""The launch proxy: ATen ops that do work per adapted linear forward+backward, reference vs fused.

    python benchmarks/layer_ops.py [--n 256 --m 256 --tokens 64] [--device cuda --dtype bfloat16]

On a GPU each such op is at least one kernel launch, and the MoE adapters are launch-bound there
(benchmarks/README.md, "GPU"), so the count of work ops (``malora_dist.adapters.cost.WorkCounter``:
views, metadata and allocations without a fill are free) is a proxy a CPU can measure. On CUDA the
kernels launched (``torch.profiler``, device events) are counted too. One training step of the
layer: forward, the balance loss's read of the router statistics, backward; not the optimizer. The
counts do not depend on the shape; the FLOPs and bytes do.
"""

from __future__ import annotations

import argparse
import json

import torch
from layer_speed import PAPER_METHODS, build

from malora_dist.adapters.cost import WorkCounter

METHODS = {"base": None, **{name: PAPER_METHODS[name] for name in (
    "lora-r64-ref", "lora-r64", "molora-r8-dense-ref", "molora-r8-dense", "malora-d32-r12-dense-ref",
    "malora-d32-r12-dense")}}
# One rank's layer with the experts split over 2 ranks (the exchange's local steps; its collectives
# are counted apart), reference parts and fused Functions.
for _method in ("molora-r8", "malora-d32-r12"):
    for _suffix, _kernel in (("-ref", "reference"), ("", "fused")):
        METHODS[f"{_method}-ep2{_suffix}"] = dict(PAPER_METHODS[f"{_method}-sparse{_suffix}"], ep=2, kernel=_kernel)


def one_step(module, x, grad, one):
    """The layer's forward and backward, with a gradient on the router's probability sums as the
    balance loss gives it (the loss itself is formed once for all layers, so it is not counted)."""
    out = module(x)
    stats = getattr(module, "router_stats", None)
    if stats is None:
        out.backward(grad)
    else:
        torch.autograd.backward([out, stats.prob_sums], [grad, one.expand(stats.prob_sums.shape)])
        module.router.clear()
    for p in module.parameters():
        p.grad = None


def count(module, x, grad) -> dict:
    one = torch.ones((), device=x.device, dtype=torch.float32)  # d(balance loss)/d(prob sums), made outside
    one_step(module, x, grad, one)  # warm-up: caches (the fused weights), lazy init
    x.grad = None
    with WorkCounter() as counter:
        one_step(module, x, grad, one)
    matmuls = sum(n.rstrip("_") in ("mm", "addmm", "bmm", "_grouped_mm") for n in counter.names)
    row = {"work_ops": int(counter.terms.ops), "matmuls": matmuls,
           "gflop": counter.terms.flops / 1e9, "other_mb": counter.terms.copy_bytes / 2**20, "ops": counter.names}
    if x.is_cuda:
        from torch.profiler import ProfilerActivity, profile
        x.grad = None
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            one_step(module, x, grad, one)
            torch.cuda.synchronize()
        row["cuda_kernels"] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return row


def measure(n=256, m=256, tokens=64, device="cpu", dtype=torch.float32) -> dict:
    rows = {}
    for name, adapter in METHODS.items():
        module = build(adapter, n, m, device, dtype)
        x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, m, device=device, dtype=dtype)
        rows[name] = count(module, x, grad)
    lora = rows["lora-r64"]["work_ops"]
    for row in rows.values():
        row["ops_over_lora_fused"] = row["work_ops"] / lora
    return {"shape": {"n": n, "m": m, "tokens": tokens, "dtype": str(dtype).replace("torch.", "")},
            "device": str(device), "torch": torch.__version__, "results": rows}


def print_table(result):
    s = result["shape"]
    cuda = any("cuda_kernels" in r for r in result["results"].values())
    print(f"one layer fwd+bwd, n={s['n']} m={s['m']} tokens={s['tokens']} {s['dtype']} on {result['device']}")
    print(f"| variant | work ops | ÷ LoRA (fused) | matmuls | GFLOP | other MB |{' CUDA kernels |' if cuda else ''}")
    print(f"|---|---|---|---|---|---|{'---|' if cuda else ''}")
    for name, r in result["results"].items():
        print(f"| {name} | {r['work_ops']} | {r['ops_over_lora_fused']:.2f} | {r['matmuls']} | {r['gflop']:.3f} | "
              f"{r['other_mb']:.2f} |{' %d |' % r['cuda_kernels'] if cuda else ''}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    parser.add_argument("--ops", action="store_true", help="also print each variant's op names")
    parser.add_argument("--output", help="write the JSON result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args.n, args.m, args.tokens, args.device, getattr(torch, args.dtype))
    print_table(result)
    if args.ops:
        for name, r in result["results"].items():
            print(f"{name}: {' '.join(r['ops'])}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
