"""AdapterLinear on a GPU against the same layer on the CPU: outputs, input gradients, every parameter
gradient, the router's auxiliary loss and the expert load.

    python benchmarks/gpu_parity.py [--device cuda] [--kernel auto|reference] [--output parity.json]

tests/test_adapter_layer.py checks the layer against an independent dense reference on the CPU only;
this script carries that check to another device. Each case builds one layer on the CPU (random
values in every adapter parameter, as the tests do), copies it to ``--device`` and runs the same
forward and backward (loss = <out, g> + the router losses) on both:

- float64 and float32: the device against the CPU in the same dtype, and both against the CPU in
  float64; a relative error (‖a − b‖ / ‖b‖) above 1e-10 (float64) or 1e-4 (float32), or a different
  expert load, fails the case. TF32 is switched off, so float32 means float32.
- bfloat16 (whole layer in bfloat16) against the CPU in float64: reported, never failing.
- "mixed": a bfloat16 base with float32 adapter parameters (what ``model.dtype: bfloat16`` builds):
  reported, never failing; it records whether the layer accepts that mix at all.

Router weights are drawn with logits of order one; inputs whose top-k routing has a near-tie
(logit margin < 1e-4 in float64) are redrawn, so that rounding
cannot flip an expert choice between the devices. Exit status 1 if any float64/float32 case fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import torch.nn as nn

from malora_dist.adapters.inject import auxiliary_loss
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.config.adapter import AdapterConfig

SHAPES = {  # (n, m, rank, num_experts, tokens)
    "mid": (256, 384, 8, 8, 1024),
    "odd": (40, 24, 2, 4, 33),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def cases(adapter_kernel="auto"):
    """``adapter_kernel``: the layers' ``adapter.kernel`` (``auto``: the fused Function wherever it runs)."""
    out = []
    for shape in SHAPES:
        for method in ("malora", "molora"):
            for kernel in ("sparse", "dense"):
                for top_k in (1, 2):
                    out.append(dict(method=method, shape=shape, top_k=top_k, expert_kernel=kernel))
        out.append(dict(method="lora", shape=shape, top_k=1))
    out += [
        dict(method="malora", shape="mid", top_k=2, expert_kernel="sparse", normalize_gates=True),
        dict(method="molora", shape="mid", top_k=2, expert_kernel="dense", normalize_gates=True),
        dict(method="malora", shape="mid", top_k=2, expert_kernel="dense", router_z_loss_coef=1e-3),
        dict(method="malora", shape="mid", top_k=2, expert_kernel="sparse", capacity_factor=1.0),
        dict(method="molora", shape="mid", top_k=2, expert_kernel="sparse", capacity_factor=1.0),
        dict(method="malora", shape="mid", top_k=2, expert_kernel="auto", leading=(4, 256)),
    ]
    return [dict(case, kernel=adapter_kernel) for case in out] if adapter_kernel != "auto" else out


def case_name(case):
    keys = [f"{case['method']}", case["shape"], f"k{case['top_k']}"]
    keys += [case[k] for k in ("expert_kernel", "kernel") if k in case]
    labels = {"normalize_gates": "normalize", "router_z_loss_coef": "zloss", "capacity_factor": "capacity",
              "leading": "3d"}
    keys += [label for key, label in labels.items() if key in case]
    return "-".join(str(k) for k in keys)


def build_layer(case, seed=0):
    """The CPU float64 layer of a case, every adapter parameter random (B̄ = 0 at init hides gradients)."""
    n, m, rank, num_experts, _ = SHAPES[case["shape"]]
    extra = {k: v for k, v in case.items() if k not in ("method", "shape", "top_k", "leading")}
    torch.manual_seed(seed)
    config = AdapterConfig(method=case["method"], rank=rank, num_experts=num_experts, top_k=case["top_k"], **extra)
    layer = AdapterLinear(nn.Linear(n, m, bias=False), config).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in layer.adapter_tensors():
            # router logits of order one (not peaked gates), everything else as the tests draw it
            scale = n ** -0.5 if name == "router.weight" else 0.5
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * scale)
    return layer


def draw_inputs(layer, case, seed=0):
    """(x, grad_out) in float64 on the CPU, redrawn while the top-k routing has a near-tie."""
    n, m, *_, tokens = SHAPES[case["shape"]]
    shape = tuple(case.get("leading", (tokens,)))
    for attempt in range(20):
        gen = torch.Generator().manual_seed(1000 * seed + attempt + 7)
        x = torch.randn(shape + (n,), generator=gen, dtype=torch.float64)
        grad = torch.randn(shape + (m,), generator=gen, dtype=torch.float64)
        if layer.config.method == "lora":
            return x, grad, 0
        logits = x.reshape(-1, n) @ layer.router.weight.detach().t()
        top = torch.topk(logits, min(layer.top_k + 1, logits.shape[-1]), dim=-1).values
        if top.shape[-1] <= layer.top_k or float((top[:, layer.top_k - 1] - top[:, layer.top_k]).min()) > 1e-4:
            return x, grad, attempt
    raise RuntimeError(f"{case_name(case)}: no input without a routing near-tie in 20 draws")


def run(layer, x, grad):
    """Forward and backward of loss = <out, grad> + router losses; everything back on the CPU in float64."""
    x = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    out = layer(x)
    aux = auxiliary_loss(layer)
    loss = (out * grad).sum() + aux.to(out.device)
    loss.backward()
    to64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    result = {"out": to64(out), "x.grad": to64(x.grad), "aux_loss": to64(aux)}
    for name, p in layer.named_parameters():
        if p.requires_grad:
            result[f"{name}.grad"] = to64(p.grad) if p.grad is not None else None
    load = getattr(layer, "expert_load", None)
    result["expert_load"] = to64(load) if load is not None else None
    return result


def errors(got, ref):
    """Per tensor: relative error (norm), max abs error, max abs error / max |ref|."""
    out = {}
    for key, b in ref.items():
        a = got.get(key)
        if key == "expert_load":
            out[key] = {"equal": (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))}
            continue
        if a is None or b is None:
            out[key] = {"rel": float("inf") if (a is None) != (b is None) else 0.0, "missing": True}
            continue
        diff = (a - b).abs()
        scale = b.abs().max().clamp(min=1e-30)
        out[key] = {"rel": float((a - b).norm() / b.norm().clamp(min=1e-30)), "max_abs": float(diff.max()),
                    "max_rel": float(diff.max() / scale)}
    return out


def worst(errs):
    rels = [e["rel"] for k, e in errs.items() if "rel" in e]
    name = max((k for k, e in errs.items() if "rel" in e), key=lambda k: errs[k]["rel"], default=None)
    return (max(rels) if rels else 0.0), name, all(e.get("equal", True) for e in errs.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="CPU torch threads")
    parser.add_argument("--kernel", default="auto", choices=("auto", "reference"),
                        help="adapter.kernel of every case (auto: fused where the layer allows it)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the reported-only bfloat16 and mixed runs")
    parser.add_argument("--output", help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    started = time.perf_counter()
    meta = {"device": str(device), "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "tf32": torch.backends.cuda.matmul.allow_tf32, "kernel": args.kernel}
    print(f"parity: {meta['device_name']} ({device}) against the CPU, torch {torch.__version__}, TF32 off", flush=True)
    rows, failures = [], []
    for case in cases(args.kernel):
        name = case_name(case)
        layer64 = build_layer(case)
        x64, g64, redraws = draw_inputs(layer64, case)
        truth = run(layer64, x64, g64)
        for dtype in (torch.float64, torch.float32):
            cpu_layer = copy.deepcopy(layer64).to(dtype)
            dev_layer = copy.deepcopy(cpu_layer).to(device)
            x, g = x64.to(dtype), g64.to(dtype)
            row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "redraws": redraws}
            try:
                on_cpu = run(cpu_layer, x, g)
                on_dev = run(dev_layer, x.to(device), g.to(device))
                vs_cpu, vs_truth = errors(on_dev, on_cpu), errors(on_dev, truth)
                cpu_vs_truth = errors(on_cpu, truth)
                rel, where, load_ok = worst(vs_cpu)
                rel_truth, where_truth, _ = worst(vs_truth)
                rel_cpu_truth, _, _ = worst(cpu_vs_truth)
                ok = rel <= TOLERANCE[dtype] and rel_truth <= TOLERANCE[dtype] and load_ok
                row.update(ok=ok, worst_rel_vs_cpu=rel, worst_tensor=where, worst_rel_vs_fp64=rel_truth,
                           worst_tensor_vs_fp64=where_truth, cpu_rel_vs_fp64=rel_cpu_truth, expert_load_equal=load_ok,
                           errors_vs_cpu=vs_cpu)
            except Exception as err:  # noqa: BLE001 - a crash is a failure of this case, reported
                row.update(ok=False, error=f"{type(err).__name__}: {err}")
            rows.append(row)
            if not row["ok"]:
                failures.append(row)
            status = "ok  " if row["ok"] else "FAIL"
            detail = (f"rel vs cpu {row['worst_rel_vs_cpu']:.2e} ({row['worst_tensor']}), "
                      f"vs fp64 {row['worst_rel_vs_fp64']:.2e} "
                      f"(cpu itself {row['cpu_rel_vs_fp64']:.2e}), load equal {row['expert_load_equal']}"
                      if "error" not in row else row["error"])
            print(f"  {status} {name:40s} {row['dtype']:8s} {detail}", flush=True)
        if not args.no_bf16:
            for label, convert in (("bfloat16", lambda layer: layer.to(torch.bfloat16)),
                                   ("mixed", _mixed)):
                row = {"case": name, "dtype": label, "reported_only": True}
                try:
                    dev_layer = convert(copy.deepcopy(layer64).to(device))
                    dev_dtype = dev_layer.base_layer.weight.dtype
                    got = run(dev_layer, x64.to(device, dev_dtype), g64.to(device, dev_dtype))
                    rel, where, load_ok = worst(errors(got, truth))
                    row.update(worst_rel_vs_fp64=rel, worst_tensor=where, expert_load_equal=load_ok)
                    detail = f"rel vs fp64 {rel:.2e} ({where}), load equal {load_ok}"
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
                    detail = "raised " + row["error"]
                rows.append(row)
                print(f"  info {name:40s} {label:8s} {detail}", flush=True)
    result = {"meta": {**meta, "elapsed_s": time.perf_counter() - started}, "failures": len(failures),
              "checked": sum(1 for r in rows if not r.get("reported_only")), "rows": rows}
    print(f"parity: {result['checked'] - len(failures)}/{result['checked']} float64/float32 cases within tolerance "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if failures else 0


def _mixed(layer):
    """A bfloat16 base under float32 adapter parameters: what a bfloat16 run builds."""
    layer.float()
    layer.base_layer.to(torch.bfloat16)
    return layer


if __name__ == "__main__":
    sys.exit(main())
