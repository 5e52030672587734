"""Where each MoE layer's experts live: split across the EP group (tokens travel by all-to-all),
or replicated on every rank (no token exchange, one larger gradient all-reduce) — DESIGN.md §2,
"Alternatives worth measuring".

``auto`` decides per layer with a cost model fed by the link's latency and bandwidth and the
device's matmul rate and per-op cost, measured at start-up on the dp group. Seconds per step that
each placement adds, per layer (M micro-batches per step, T tokens per rank and step):

- ep: 5 collectives per micro-batch (count exchange, dispatch and combine, and their two backward
  mirrors), ``2·T·k·(w + m)·bytes·(ep−1)/ep`` bytes off the rank (w = d for MALoRA, n for MoLoRA),
  the sparse kernel's extra small ops per micro-batch (sort, gather, regroup, scatter, and a loop
  over the N/ep local experts) at the measured per-op cost, and its memory passes over the
  (token, expert) slots — about 20 m-wide and 13 w-wide reads or writes per slot, forward and
  backward, counted below — at the measured copy bandwidth;
- replicate: the extra gradient all-reduce traffic of holding all N experts instead of N/ep,
  ``2·(dp−1)/dp·N·P − 2·(edp−1)/edp·(N/ep)·P`` bytes (P = bytes of one expert), fused into the
  existing gradient buckets (no extra calls), and the local kernel's compute: the dense kernel's
  extra FLOPs (it computes all N experts for every token where routing needs k,
  ``6·T·(N−k)·r·(w + m)``, forward 2 and backward 4, at the measured matmul rate), or, where the
  layer computes local experts sparsely (N > DENSE_KERNEL_MAX_EXPERTS under ``auto``), the sparse
  kernel's small ops for all N experts and its memory passes.

What it leaves out (see benchmarks/README.md, "Crossover"): ranks waiting for each other at every
collective beyond the measured latency, and the cache behaviour of the dense kernel at large N·T.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

PLACEMENTS = ("ep", "replicate", "auto")
EXCHANGE_CALLS_PER_MICRO_BATCH = 5
# Small ops the sparse kernel runs beyond the dense one, per micro-batch, counted in
# ``AdapterLinear._moe`` / ``_run_experts`` and ``AllToAllExchange`` (forward and backward):
SPARSE_EXTRA_OPS = 12  # argsort, bincount, row gather, regroup (repeat_interleave, argsort, index),
#                        index_copy, gate gather and product, index_add, and their backward ops
SPARSE_OPS_PER_LOCAL_EXPERT = 8  # two products forward, four backward, a slice and a cat
# Numbers read or written per slot by the sparse path and not by the dense one (forward + backward):
# m-wide: expert output, cat, index_copy to source order, combine, gate product, index_add (10) and
# their backward: index_select, gate product and gate gradient, combine, index_select (10);
# w-wide: row gather, dispatch, regroup (6) and their backward scatters and zero fills (7).
SPARSE_M_PASSES, SPARSE_W_PASSES = 20, 13


@dataclass(frozen=True)
class LinkModel:
    """The link (latency, bandwidth) and the device's compute (matmul rate, cost of one small op)."""

    latency_s: float
    bytes_per_s: float
    flops_per_s: float = float("inf")
    op_s: float = 0.0
    copy_bytes_per_s: float = float("inf")  # bytes read + written per second by a large copy


def _agree_on_slowest(value: float, group: Optional[dist.ProcessGroup], device: torch.device) -> float:
    """Every rank must take the same decision: agree on the slowest rank's measurement."""
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _median_time(fn, device: torch.device, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def measure_compute(device: torch.device, group: Optional[dist.ProcessGroup] = None,
                    repeats: int = 10) -> tuple[float, float, float]:
    """(matmul FLOP/s at an adapter-like skinny shape, seconds per small op, copy bytes/s), slowest
    rank's."""
    a, b = torch.randn(1024, 576, device=device), torch.randn(576, 96, device=device)
    tiny = torch.randn(8, 8, device=device)
    a @ b  # warm-up (first-call allocations, kernel selection)
    matmul_s = _median_time(lambda: a @ b, device, repeats)
    ops = 50
    op_s = _median_time(lambda: [tiny @ tiny for _ in range(ops)], device, repeats) / ops
    src, dst = torch.randn(1 << 22, device=device), torch.empty(1 << 22, device=device)
    dst.copy_(src)
    copy_s = _agree_on_slowest(_median_time(lambda: dst.copy_(src), device, repeats), group, device)
    matmul_s = _agree_on_slowest(matmul_s, group, device)
    return (2 * a.shape[0] * a.shape[1] * b.shape[1] / max(matmul_s, 1e-12), _agree_on_slowest(op_s, group, device),
            2 * src.numel() * src.element_size() / max(copy_s, 1e-12))


def measure_link(group: Optional[dist.ProcessGroup], device: torch.device, repeats: int = 10) -> LinkModel:
    """Latency from a one-element all-reduce, bandwidth from a 4 MiB one (medians), and the compute
    rates of ``measure_compute``."""
    if group is None:
        return LinkModel(0.0, float("inf"))

    def timed(numel: int) -> float:
        t = torch.zeros(numel, device=device)

        def once():
            dist.barrier(group=group)
            dist.all_reduce(t, group=group)
        # the barrier is timed too, but it returns when the slowest rank arrives: what is left is
        # close to one more all-reduce latency, as for the collectives it models
        return _agree_on_slowest(_median_time(once, device, repeats), group, device) / 2

    latency = timed(1)
    big = 1 << 20
    size = dist.get_world_size(group)
    ring_bytes = 2 * (size - 1) / size * big * 4
    flops, op_s, copy_bytes_per_s = measure_compute(device, group)
    return LinkModel(latency, ring_bytes / max(timed(big) - latency, 1e-9), flops, op_s, copy_bytes_per_s)


@dataclass(frozen=True)
class PlacementCosts:
    exchange_s: float
    replicate_s: float

    @property
    def choice(self) -> str:
        return "replicate" if self.replicate_s <= self.exchange_s else "ep"


def placement_costs(layer, tokens_per_rank: int, dp: int, ep: int, link: LinkModel, bytes_per_number: int = 4,
                    micro_batches: int = 1) -> PlacementCosts:
    """Predicted seconds per step that each placement adds for one layer (full sizes, before sharding);
    ``tokens_per_rank``: per step, over its ``micro_batches``."""
    width = layer.expert_down.shape[-1]  # d for MALoRA, n for MoLoRA
    m, rank = layer.expert_up.shape[1], layer.expert_up.shape[2]
    num, k = layer.num_experts, layer.top_k
    slots = tokens_per_rank * k
    exchange_bytes = 2 * slots * (width + m) * bytes_per_number * (ep - 1) / ep
    sparse_ops = SPARSE_EXTRA_OPS + SPARSE_OPS_PER_LOCAL_EXPERT * num // ep
    sparse_bytes = slots * (SPARSE_M_PASSES * m + SPARSE_W_PASSES * width) * bytes_per_number
    exchange = micro_batches * (EXCHANGE_CALLS_PER_MICRO_BATCH * link.latency_s + sparse_ops * link.op_s) \
        + exchange_bytes / link.bytes_per_s + sparse_bytes / link.copy_bytes_per_s
    expert_bytes = (layer.expert_down[0].numel() + layer.expert_up[0].numel()) * bytes_per_number
    edp = dp // ep
    extra = 2 * (dp - 1) / dp * num * expert_bytes - 2 * (edp - 1) / edp * num / ep * expert_bytes
    if layer.dense_when_local():  # all N experts for every token, where routing needs k
        local_compute = 6 * tokens_per_rank * max(num - k, 0) * rank * (width + m) / link.flops_per_s
    else:  # the sparse kernel over all N experts, without the exchange
        local_compute = (micro_batches * (SPARSE_EXTRA_OPS + SPARSE_OPS_PER_LOCAL_EXPERT * num) * link.op_s
                         + sparse_bytes / link.copy_bytes_per_s)
    return PlacementCosts(exchange, max(extra, 0.0) / link.bytes_per_s + local_compute)
