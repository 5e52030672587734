"""What a real run on this machine holds and how long its steps take, and this machine described
for the step-time model: the ground truth the planner is checked against (tests, benchmarks).

Collective: every rank of an already started world calls these (``local_world.run_local_world``).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from malora_dist.adapters.cost import count_work
from malora_dist.adapters.inject import adapter_parameters
from malora_dist.parallel.gradients import clip_grad_norm_, reduce_gradients
from malora_dist.parallel.placement import measure_compute, measure_link
from malora_dist.plan.machine import Machine
from malora_dist.plan.rank_build import plan_run_config
from malora_dist.runtime.distributed import pick_backend_and_device
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.train.build import build_model
from malora_dist.train.optim import build_optimizer


def calibrated_machine(repeats: int = 10) -> Machine:
    """This world's link (gloo all-reduce latency and ring bandwidth over every rank) and compute
    (adapter-shaped matmul rate, cost of one small op, copy bandwidth), measured with all ranks busy,
    as ``auto`` placement measures them: every group lies within one "node"."""
    _, device = pick_backend_and_device()
    group = dist.new_group(list(range(dist.get_world_size())))
    link = measure_link(group, device, repeats=repeats) if dist.get_world_size() > 1 else None
    flops, op_s, copy = measure_compute(device, group if dist.get_world_size() > 1 else None, repeats)
    latency, bandwidth = (link.latency_s, link.bytes_per_s) if link else (0.0, float("inf"))
    op_s = max(op_s, _autograd_op_s(repeats))
    return Machine("this CPU (measured)", peak_flops=flops, memory_bytes_per_s=copy, memory_bytes=0.0,
                   gpus_per_node=dist.get_world_size(), intra_latency_s=latency, intra_bytes_per_s=bandwidth,
                   inter_latency_s=latency, inter_bytes_per_s=bandwidth, op_s=op_s,
                   source="measured on this machine: gloo all-reduce, matmul, small op, copy")


def _autograd_op_s(repeats: int) -> float:
    """Seconds per ATen op of a small module chain run forward and backward: a training step's ops
    carry autograd's and the modules' bookkeeping, which a bare op in a loop does not."""

    layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.SiLU()) for _ in range(16)])
    x = torch.randn(4, 8)

    def once():
        layers.zero_grad(set_to_none=True)
        layers(x).sum().backward()

    once()
    ops = count_work(once).ops
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2] / ops


# The exchange's collectives as the profiler names them on the calling thread: the count exchange
# (``c10d::alltoall_base_``), the rows' all-to-alls (functional, forward and backward) and the waits
# on rows in flight. Each is counted where no other of them encloses it (the functional call runs
# the c10d one inside).
EXCHANGE_EVENTS = ("c10d::alltoall_base_", "_c10d_functional::all_to_all_single", "_c10d_functional::wait_tensor")


def _exchange_share(step) -> float:
    """The share of one step spent in the exchange's collectives, waits for the other ranks
    included (a profiled step of its own: the profiler's overhead stays out of the timed ones and
    cancels in the share)."""

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    wall = time.perf_counter() - start
    total = 0.0
    for event in prof.events():
        if event.name not in EXCHANGE_EVENTS:
            continue
        parent = event.cpu_parent
        while parent is not None and parent.name not in EXCHANGE_EVENTS:
            parent = parent.cpu_parent
        if parent is None:
            total += event.cpu_time_total
    return total / 1e6 / wall


def _one_step(model, config, generator, micro_batches, params, groups, optimizer) -> None:
    for _ in range(micro_batches):
        ids, positions = _batch(config, generator)
        model.token_losses(model(ids, positions), ids).sum().backward()
    reduce_gradients(params, groups)
    clip_grad_norm_(params, 1.0, groups)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batch(config, generator):
    b, s = config.train.micro_batch_size, config.data.seq_len
    ids = torch.randint(0, 1000, (b, s), generator=generator)
    return ids, torch.arange(s).expand(b, s)


def measured_run(config_path: str, overrides: list, model_config=None, steps: int = 3) -> dict:
    """Build the run's model for real, then: the bytes it allocates (parameters, gradients, AdamW
    state after a step, the activations one micro-batch saves), and per-phase seconds of ``steps``
    steps after one warm-up step (medians): forward, backward, all-reduce (gradients and norm),
    optimizer, and the exchange within forward and backward (its share of a profiled step times
    the median step)."""
    config = plan_run_config(config_path, overrides, model_config)
    _, device = pick_backend_and_device()
    groups = ParallelGroups.build(config.parallel.tp, config.parallel.ep,
                                  config.adapter.num_experts if config.adapter.is_moe else None,
                                  megatron_gloo_groups=False)
    model = build_model(config, groups, device)
    params = adapter_parameters(model)
    optimizer = build_optimizer(params, 1e-4, 0.0)
    generator = torch.Generator().manual_seed(groups.dp_rank)
    micro_batches = config.train.global_batch_size // (groups.dp * config.train.micro_batch_size)
    saved: dict = {}
    excluded = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in excluded:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    phases = []
    for step in range(steps + 1):
        times = dict.fromkeys(("forward_s", "backward_s", "all_reduce_s", "optimizer_s"), 0.0)
        dist.barrier()
        for index in range(micro_batches):
            ids, positions = _batch(config, generator)
            t0 = time.perf_counter()
            if step == 0 and index == 0:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model.token_losses(model(ids, positions), ids).sum()
            else:
                loss = model.token_losses(model(ids, positions), ids).sum()
            t1 = time.perf_counter()
            loss.backward()
            times["forward_s"] += t1 - t0
            times["backward_s"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        reduce_gradients(params, groups)
        clip_grad_norm_(params, 1.0, groups)
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        times["all_reduce_s"], times["optimizer_s"] = t3 - t2, t4 - t3
        if step == 0:
            grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
            optimizer.zero_grad(set_to_none=True)
            continue
        optimizer.zero_grad(set_to_none=True)
        phases.append(times)
    exchange_share = _exchange_share(
        lambda: _one_step(model, config, generator, micro_batches, params, groups, optimizer))
    ids_trainable = {id(p) for p in params}
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    medians = {k: sorted(p[k] for p in phases)[len(phases) // 2] for k in phases[0]}
    medians["step_s"] = sorted(sum(p.values()) for p in phases)[len(phases) // 2]
    return dict(
        rank=dist.get_rank(),
        frozen_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in ids_trainable)
        + sum(b.numel() * b.element_size() for b in model.buffers()),
        trainable_bytes=sum(p.numel() * p.element_size() for p in params),
        gradient_bytes=grads, optimizer_bytes=state, activation_bytes=sum(saved.values()),
        times=dict(medians, exchange_s=exchange_share * medians["step_s"]))
