"""Where each MoE layer's experts live: split across the EP group (tokens travel by all-to-all),
or replicated on every rank (no token exchange, one larger gradient all-reduce) — DESIGN.md §2,
"Alternatives worth measuring".

``auto`` decides per layer with a cost model fed by the link's latency and bandwidth, measured at
start-up on the dp group:

- exchange: 5 collectives per layer and step (count exchange, dispatch and combine, and their two
  backward mirrors) and ``2·T·k·(w + m)·bytes·(ep−1)/ep`` bytes off the rank (w = d for MALoRA, n
  for MoLoRA, T = tokens per rank and step);
- replicate: the extra gradient all-reduce traffic of holding all N experts instead of N/ep,
  ``2·(dp−1)/dp·N·P − 2·(edp−1)/edp·(N/ep)·P`` bytes (P = bytes of one expert), fused into the
  existing gradient buckets (no extra calls).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

PLACEMENTS = ("ep", "replicate", "auto")
EXCHANGE_CALLS_PER_STEP = 5


@dataclass(frozen=True)
class LinkModel:
    latency_s: float
    bytes_per_s: float


def measure_link(group: Optional[dist.ProcessGroup], device: torch.device, repeats: int = 10) -> LinkModel:
    """Latency from a one-element all-reduce, bandwidth from a 4 MiB one (medians)."""
    if group is None:
        return LinkModel(0.0, float("inf"))

    def timed(numel: int) -> float:
        t = torch.zeros(numel, device=device)
        samples = []
        for _ in range(repeats):
            dist.barrier(group=group)
            start = time.perf_counter()
            dist.all_reduce(t, group=group)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append(time.perf_counter() - start)
        # Every rank must take the same decision: agree on the slowest rank's median.
        value = torch.tensor([sorted(samples)[len(samples) // 2]], dtype=torch.float64, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value.item()

    latency = timed(1)
    big = 1 << 20
    size = dist.get_world_size(group)
    ring_bytes = 2 * (size - 1) / size * big * 4
    return LinkModel(latency, ring_bytes / max(timed(big) - latency, 1e-9))


@dataclass(frozen=True)
class PlacementCosts:
    exchange_s: float
    replicate_s: float

    @property
    def choice(self) -> str:
        return "replicate" if self.replicate_s <= self.exchange_s else "ep"


def placement_costs(layer, tokens_per_rank: int, dp: int, ep: int, link: LinkModel, bytes_per_number: int = 4) -> PlacementCosts:
    """Predicted seconds per step that each placement adds for one layer."""
    width = layer.expert_down.shape[-1]  # d for MALoRA, n for MoLoRA (full sizes before sharding)
    m = layer.expert_up.shape[1]
    slots = tokens_per_rank * layer.top_k
    exchange_bytes = 2 * slots * (width + m) * bytes_per_number * (ep - 1) / ep
    exchange = EXCHANGE_CALLS_PER_STEP * link.latency_s + exchange_bytes / link.bytes_per_s
    expert_bytes = (layer.expert_down[0].numel() + layer.expert_up[0].numel()) * bytes_per_number
    edp = dp // ep
    extra = 2 * (dp - 1) / dp * layer.num_experts * expert_bytes - 2 * (edp - 1) / edp * layer.num_experts / ep * expert_bytes
    return PlacementCosts(exchange, max(extra, 0.0) / link.bytes_per_s)
