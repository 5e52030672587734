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
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from .accumulate import add_rows
from .cost import CostTerms
from .router import Routing
from .routing import SlotPlan, plan_slots


@dataclass
class TrafficCounter:
    """Bytes handed to the all-to-all per direction (own rows included, so the closed form is exact),
    the share of them that leaves this rank, and slots dropped by the capacity limit."""

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    dispatch_bytes_remote: int = 0
    combine_bytes_remote: int = 0
    count_exchange_bytes: int = 0
    calls: int = 0
    dropped_slots: int = 0

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DenseBatch:
    """Every token's adapter input and its (T, N) gates (zero where not routed; None for LoRA)."""

    inputs: torch.Tensor
    gates: Optional[torch.Tensor]


@dataclass
class RowBatch:
    """Rows grouped by local expert, and the row count of each local expert, on the device
    (``count_tensor``) and, where the host already has them, as a list (``host_counts``)."""

    rows: torch.Tensor
    count_tensor: torch.Tensor
    host_counts: Optional[list] = None

    @property
    def counts(self) -> list:
        return self.host_counts if self.host_counts is not None else self.count_tensor.tolist()


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
    state: tuple = ()


class GroupedDispatch:
    """(token, expert) slots sorted by expert, so that each expert's rows are one contiguous run."""

    def __init__(self, num_experts: int, capacity_factor: Optional[float]):
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.traffic = TrafficCounter()

    def send(self, z: torch.Tensor, routing: Routing) -> SentRows:
        plan = plan_slots(routing.experts, self.num_experts, self.capacity_factor)
        self.traffic.dropped_slots += plan.dropped
        return self._start(SentRows(plan, routing.gates, z[plan.token_of_slot]))

    def _start(self, sent: SentRows) -> SentRows:
        return sent

    def receive(self, sent: SentRows) -> RowBatch:
        return RowBatch(sent.rows, sent.plan.count_tensor)

    def combine(self, result: torch.Tensor, sent: SentRows, out: torch.Tensor) -> torch.Tensor:
        rows = self._return(result, sent)
        slot_gates = sent.gates.reshape(-1)[sent.plan.order].unsqueeze(-1)
        return add_rows(out, sent.plan.token_of_slot, (rows * slot_gates.to(rows.dtype)).to(out.dtype))

    def _return(self, rows: torch.Tensor, sent: SentRows) -> torch.Tensor:
        return rows


class AllToAllDispatch(GroupedDispatch):
    """``group`` None (with ep_size 1) runs the same local steps without communication: that is how
    the cost model counts this dispatcher's own ops."""

    # count exchange, rows out, rows back (forward), and the rows' two backward mirrors
    COLLECTIVES_PER_MICRO_BATCH = 5

    def __init__(self, num_experts: int, capacity_factor: Optional[float], group: Optional[dist.ProcessGroup],
                 ep_size: int, ep_rank: int):
        super().__init__(num_experts, capacity_factor)
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_experts // ep_size

    def _all_to_all(self, t: torch.Tensor, output_splits: list, input_splits: list):
        if self.group is None:
            return t
        return all_to_all_single_autograd(t.contiguous(), output_splits, input_splits, self.group)

    def _start(self, sent: SentRows) -> SentRows:
        """Start sending each run of rows to its expert's owner. The count exchange blocks (the
        receive sizes are needed on the host); the rows' all-to-all is left in flight (a functional
        collective, waited for in ``receive``): that hides the wait for a slower rank, not only the
        transfer."""
        ep, local, rows = self.ep_size, self.num_local_experts, sent.rows
        send_counts = sent.plan.count_tensor
        recv_counts = torch.empty_like(send_counts)
        if self.group is None:
            recv_counts.copy_(send_counts)
        else:
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_matrix = recv_counts.view(ep, local)  # [source rank, local expert]
        send_splits = send_counts.view(ep, local).sum(1).tolist()
        recv_splits = recv_matrix.sum(1).tolist()
        in_flight = self._all_to_all(rows, recv_splits, send_splits)

        width = rows.shape[-1] * rows.element_size()
        self.traffic.dispatch_bytes += sum(send_splits) * width
        self.traffic.dispatch_bytes_remote += (sum(send_splits) - send_splits[self.ep_rank]) * width
        self.traffic.count_exchange_bytes += send_counts.numel() * send_counts.element_size()
        self.traffic.calls += 1
        return SentRows(sent.plan, sent.gates, in_flight, (recv_matrix, send_splits, recv_splits))

    def receive(self, sent: SentRows) -> RowBatch:
        recv_matrix, _, _ = sent.state
        received = wait_tensor(sent.rows) if self.group is not None else sent.rows
        # Rows arrive source-major; the experts want them expert-major.
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local_experts, device=received.device).repeat(self.ep_size), recv_matrix.reshape(-1))
        perm = torch.argsort(expert_of_row, stable=True)
        sent.state = (*sent.state, perm)
        local_counts = recv_matrix.sum(0)
        return RowBatch(received[perm], local_counts, local_counts.tolist())

    def _return(self, rows: torch.Tensor, sent: SentRows) -> torch.Tensor:
        """Send expert outputs back to the ranks their tokens came from, in their original order."""
        _, send_splits, recv_splits, perm = sent.state
        source_major = torch.empty_like(rows).index_copy(0, perm, rows)
        width = rows.shape[-1] * rows.element_size()
        self.traffic.combine_bytes += sum(recv_splits) * width
        self.traffic.combine_bytes_remote += (sum(recv_splits) - recv_splits[self.ep_rank]) * width
        back = self._all_to_all(source_major, send_splits, recv_splits)
        return wait_tensor(back) if self.group is not None else back

    @staticmethod
    def link_terms(slots: int, width: int, m: int, ep: int, bytes_per_number: int) -> CostTerms:
        """Per micro-batch of ``slots`` (token, expert) slots: the collectives, and the bytes that
        leave the rank (rows of ``width`` out and ``m`` back, forward and backward; ``m`` is d where
        the shared S_B applies after the return)."""
        return CostTerms(collectives=AllToAllDispatch.COLLECTIVES_PER_MICRO_BATCH,
                         link_bytes=2 * slots * (width + m) * bytes_per_number * (ep - 1) / ep)
