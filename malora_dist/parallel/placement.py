"""Where each MoE layer's experts live: split across the EP group (tokens travel by all-to-all),
or replicated on every rank (no token exchange, one larger gradient all-reduce) —
docs/ARCHITECTURE.md §6 (placement).

``auto`` decides per layer from the cost terms the layer's own parts report
(``malora_dist.adapters.cost``), priced by the link and the device measured at start-up: the
all-to-all's latency and bandwidth on the EP group that carries it, the gradient all-reduce's
bandwidth on the dp group, the matmul rate, the cost of one small op and the copy bandwidth.

- ep: the all-to-all dispatcher's collectives and bytes (``AllToAllDispatch.link_terms``, at the
  activations' dtype; per slot the variant's ``sent_width`` out and ``returned_width`` back), plus
  the local work of the dispatcher and the grouped experts on N/ep experts, counted from their own
  ATen ops (``count_work``);
- replicate: the extra gradient all-reduce bytes of holding all N experts instead of N/ep,
  ``2·(dp−1)/dp·N·P − 2·(edp−1)/edp·(N/ep)·P`` (P = bytes of one expert's trainable parts in the
  variant, fp32 gradients), plus the local work of the kernel the layer would use for N local
  experts.

What it leaves out (see benchmarks/README.md, "Crossover"): ranks waiting for each other at every
collective beyond the measured latency, and cache effects at large N·T.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from malora_dist.adapters.cost import CostTerms, count_work
from malora_dist.adapters.dispatch import AllToAllDispatch
from malora_dist.adapters.layer_class import adapter_linear
from malora_dist.adapters.layout import AdapterLayout
from malora_dist.adapters.variant import AdapterVariant
from malora_dist.config.adapter import AdapterConfig

PLACEMENTS = ("ep", "replicate", "auto")


@dataclass(frozen=True)
class LinkModel:
    """The links (latency and bandwidth of the EP group, all-reduce bandwidth of the dp group) and
    the device's compute (matmul rate, cost of one small op, copy bandwidth)."""

    latency_s: float
    bytes_per_s: float
    flops_per_s: float = float("inf")
    op_s: float = 0.0
    copy_bytes_per_s: float = float("inf")  # bytes read + written per second by a large copy
    reduce_bytes_per_s: float = float("inf")


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


def _all_reduce_timing(group: dist.ProcessGroup, device: torch.device, repeats: int) -> tuple[float, float]:
    """(latency, ring bandwidth) of all-reduces on ``group``: a one-element one and a 4 MiB one (medians)."""
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
    return latency, 2 * (size - 1) / size * big * 4 / max(timed(big) - latency, 1e-9)


def measure_link(exchange_group: Optional[dist.ProcessGroup], device: torch.device,
                 reduce_group: Optional[dist.ProcessGroup] = None, repeats: int = 10) -> LinkModel:
    """The EP group's latency and bandwidth (the exchange runs there), the dp group's all-reduce
    bandwidth (``reduce_group``, default the EP group) and the compute rates of ``measure_compute``.
    Collective: every rank of both groups calls it."""
    if exchange_group is None:
        return LinkModel(0.0, float("inf"))
    latency, bandwidth = _all_reduce_timing(exchange_group, device, repeats)
    reduce_bandwidth = bandwidth
    if reduce_group is not None and reduce_group is not exchange_group:
        reduce_bandwidth = _all_reduce_timing(reduce_group, device, repeats)[1]
    flops, op_s, copy_bytes_per_s = measure_compute(device, exchange_group)
    return LinkModel(latency, bandwidth, flops, op_s, copy_bytes_per_s, reduce_bandwidth)


@dataclass(frozen=True)
class PlacementCosts:
    exchange_s: float
    replicate_s: float
    exchange_terms: CostTerms
    replicate_terms: CostTerms

    @property
    def choice(self) -> str:
        return "replicate" if self.replicate_s <= self.exchange_s else "ep"


_WORK: dict = {}


def layer_work(config: AdapterConfig, n: int, m: int, ep: int, tokens: int, dtype: torch.dtype) -> CostTerms:
    """The adapter's own work for one micro-batch of ``tokens`` tokens (forward and backward), at
    placement ``ep`` (experts split over ``ep`` ranks; the exchange itself excluded) or, for ep=1,
    with all experts local. Counted at two small token counts and extrapolated linearly: op counts
    do not depend on the tokens, bytes and FLOPs grow with them."""
    key = (repr(config.to_dict()), n, m, ep, dtype)
    if key not in _WORK:
        _WORK[key] = _counted_work(config, n, m, ep, dtype)
    small, per_token = _WORK[key]
    return small + per_token.scaled(tokens - 8)


def _counted_work(config: AdapterConfig, n: int, m: int, ep: int, dtype: torch.dtype) -> tuple[CostTerms, CostTerms]:
    """The layer around a real frozen linear, so that the kernel it picks (the fused Functions fold
    the base's product in) is the one counted, less the same linear's work alone (the base's is the
    same at either placement)."""
    layout = AdapterLayout(ep_size=ep) if ep > 1 else AdapterLayout()
    base = nn.Linear(n, m, bias=False).to(dtype)
    layer = adapter_linear(base, config, layout=layout)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.expert_up.normal_(generator=gen)

    def run(count: int) -> CostTerms:
        layer.zero_grad(set_to_none=True)  # as in training: no accumulation into the previous run's gradients
        x = torch.randn(count, n, generator=gen).to(dtype)
        with_adapter = count_work(lambda: layer(x.requires_grad_()).float().sum().backward())
        alone = count_work(lambda: base(x.detach().requires_grad_()).float().sum().backward())
        return with_adapter + alone.scaled(-1)

    run(8)  # warm-up: the fused kernels build their weights once per optimizer step, not per micro-batch
    small, large = run(8), run(16)
    per_token = (large + small.scaled(-1)).scaled(1 / 8)
    per_token.ops = 0.0
    return small, per_token


def placement_costs(config: AdapterConfig, n: int, m: int, tokens_per_rank: int, dp: int, ep: int, link: LinkModel,
                    micro_batches: int = 1, dtype: torch.dtype = torch.float32,
                    exchange_members: int = 1) -> PlacementCosts:
    """Predicted seconds per step of each placement for one layer (``n``, ``m``: full sizes);
    ``tokens_per_rank``: per step, over its ``micro_batches``; ``exchange_members``: the adapted
    layers that would share this layer's exchange (q/k/v: 3, gate/up: 2; ``siblings.py``)."""
    variant = AdapterVariant.of(config, n, m)
    tokens = max(tokens_per_rank // micro_batches, 1)
    bytes_per_number = torch.empty((), dtype=dtype).element_size()
    # what travels per slot, and what comes back (d where S_B applies after the return)
    exchange = (AllToAllDispatch.link_terms(tokens * variant.top_k, variant.sent_width, variant.returned_width, ep,
                                            bytes_per_number, exchange_members)
                + layer_work(config, n, m, ep, tokens, dtype)).scaled(micro_batches)
    expert_bytes = variant.trainable_numbers_per_expert * 4  # fp32 gradients; frozen parts have none
    num, edp = config.num_experts, dp // ep
    extra = 2 * (dp - 1) / dp * num * expert_bytes - 2 * (edp - 1) / edp * num / ep * expert_bytes
    replicate = (CostTerms(reduce_bytes=max(extra, 0.0))
                 + layer_work(config, n, m, 1, tokens, dtype).scaled(micro_batches))
    return PlacementCosts(exchange.seconds(link), replicate.seconds(link), exchange, replicate)
