"""Dispatchers: how the adapter inputs of routed tokens reach their experts and how the experts'
results come back into the layer's output (docs/ARCHITECTURE.md §2 (layer parts), §3.4
(all-to-all)).

Each has three calls, so that the layer computes the frozen base while rows are in flight:
``send(z, routing)``, ``receive(sent)`` → the experts' batch, ``combine(result, sent, out)``.

- ``DenseDispatch``: all experts on this rank, every token to every expert, masked by a (T, N)
  gate matrix: no sort, no gather, static shapes (the experts add into the output themselves);
- ``GroupedDispatch``: all experts on this rank, (token, expert) slots sorted by expert into rows;
- ``AllToAllDispatch``: experts split over the EP group; the sorted rows travel to their experts'
  owners by all-to-all (the FastMoE protocol: exchange the per-expert counts, then the rows with
  uneven splits) and back. Every rank issues the same collectives in the same order whether or not
  it has rows (docs/ARCHITECTURE.md §3.6 (hang rules)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from malora_dist.adapters.accumulate import add_rows
from malora_dist.adapters.cost import CostTerms
from malora_dist.adapters.exchange import COLLECTIVES_PER_EXCHANGE, ExpertExchange, RowBatch, TrafficCounter
from malora_dist.adapters.gating import SlotPlan, plan_slots
from malora_dist.adapters.router import Routing

__all__ = ["AllToAllDispatch", "DenseBatch", "DenseDispatch", "GroupedDispatch", "RowBatch", "SentRows",
           "TrafficCounter", "gated_rows_into"]


@dataclass
class DenseBatch:
    """Every token's adapter input and its (T, N) gates (zero where not routed; None for LoRA)."""

    inputs: torch.Tensor
    gates: Optional[torch.Tensor]


class DenseDispatch:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.traffic = TrafficCounter()

    def send(self, z: torch.Tensor, routing: Optional[Routing]) -> DenseBatch:
        if routing is None:
            return DenseBatch(z, None)
        gates = torch.zeros(z.shape[0], self.num_experts, dtype=z.dtype, device=z.device)
        return DenseBatch(z, gates.scatter(1, routing.experts, routing.gates.to(z.dtype)))

    def receive(self, sent: DenseBatch) -> DenseBatch:
        return sent

    def combine(self, result: torch.Tensor, sent: DenseBatch, out: torch.Tensor) -> torch.Tensor:
        return result  # the dense experts added into ``out`` already


@dataclass
class SentRows:
    plan: SlotPlan
    gates: torch.Tensor
    rows: object  # the sorted rows, or the exchange's handle while they travel


class GroupedDispatch:
    """(token, expert) slots sorted by expert, so that each expert's rows are one contiguous run."""

    def __init__(self, num_experts: int, capacity_factor: Optional[float]):
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.traffic = TrafficCounter()

    def send(self, z: torch.Tensor, routing: Routing) -> SentRows:
        plan = plan_slots(routing.experts, self.num_experts, self.capacity_factor, routing.counts)
        self.traffic.dropped_slots += plan.dropped
        return self._start(SentRows(plan, routing.gates, z[plan.token_of_slot]))

    def _start(self, sent: SentRows) -> SentRows:
        return sent

    def receive(self, sent: SentRows) -> RowBatch:
        return RowBatch(sent.rows, sent.plan.count_tensor)

    def combine(self, result: torch.Tensor, sent: SentRows, out: torch.Tensor) -> torch.Tensor:
        return gated_rows_into(out, self._return(result, sent), sent.plan, sent.gates)

    def _return(self, rows: torch.Tensor, sent: SentRows) -> torch.Tensor:
        return rows


def gated_rows_into(out: torch.Tensor, rows: torch.Tensor, plan: SlotPlan, gates: torch.Tensor) -> torch.Tensor:
    """``out`` with each returned row, times its slot's gate, added to its token's row."""
    slot_gates = gates.reshape(-1)[plan.order].unsqueeze(-1)
    return add_rows(out, plan.token_of_slot, (rows * slot_gates.to(rows.dtype)).to(out.dtype))


class AllToAllDispatch(GroupedDispatch):
    """Experts split over the EP group: one layer's rows through an ``ExpertExchange`` (layers that
    read the same input share one instead: ``siblings.SiblingExchange``). ``group`` None (with
    ep_size 1) runs the same local steps without communication: that is how the cost model counts
    this dispatcher's own ops."""

    COLLECTIVES_PER_MICRO_BATCH = COLLECTIVES_PER_EXCHANGE

    def __init__(self, num_experts: int, capacity_factor: Optional[float], group: Optional[dist.ProcessGroup],
                 ep_size: int, ep_rank: int, source_major: bool = False):
        super().__init__(num_experts, capacity_factor)
        self.exchange = ExpertExchange(group, ep_size, ep_rank, num_experts)
        self.source_major = source_major  # the experts take the received rows as they arrived

    def _start(self, sent: SentRows) -> SentRows:
        flight = self.exchange.send([sent.plan], [sent.rows], [self.traffic])
        return SentRows(sent.plan, sent.gates, flight)

    def receive(self, sent: SentRows) -> RowBatch:
        (batch,) = self.exchange.receive(sent.rows, [self.source_major])
        return batch

    def _return(self, rows: torch.Tensor, sent: SentRows) -> torch.Tensor:
        (back,) = self.exchange.give_back([rows], sent.rows, [self.traffic])
        return back

    @staticmethod
    def link_terms(slots: int, width: int, m: int, ep: int, bytes_per_number: int, members: int = 1) -> CostTerms:
        """Per micro-batch of ``slots`` (token, expert) slots: the collectives, and the bytes that
        leave the rank (rows of ``width`` out and ``m`` back, forward and backward; ``m`` is d where
        the shared S_B applies after the return). ``members``: layers sharing the exchange
        (``siblings.py``), which split its collectives; each still moves its own bytes."""
        return CostTerms(collectives=AllToAllDispatch.COLLECTIVES_PER_MICRO_BATCH / members,
                         link_bytes=2 * slots * (width + m) * bytes_per_number * (ep - 1) / ep)
