"""FastMoE-style token exchange between expert-parallel ranks on ``torch.distributed``.

Per MoE layer: exchange per-expert slot counts (one small ``all_to_all_single``), then the rows
with uneven splits (``all_to_all_single`` with autograd, left in flight while the layer computes
the frozen base's product), group the received rows by local expert, and mirror both steps on the
way back. It runs on NCCL and gloo alike; the list form
``all_to_all`` is avoided because gloo rejects uneven sizes with it.

Hang rules (DESIGN.md §2): every rank issues the same collectives in the same order whether or not
it has rows to send or receive; an expert with no rows still runs its zero-row matmul.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from ..adapters.exchange import TrafficCounter


def _all_to_all(rows: torch.Tensor, output_splits: list, input_splits: list, group) -> torch.Tensor:
    return wait_tensor(all_to_all_single_autograd(rows.contiguous(), output_splits, input_splits, group))


class AllToAllExchange:
    def __init__(self, group: dist.ProcessGroup, ep_size: int, ep_rank: int, num_local_experts: int):
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_local_experts
        self.traffic = TrafficCounter()

    def send(self, rows: torch.Tensor, counts: list):
        """Start sending each run of rows (sorted by global expert) to the expert's owner.

        The count exchange blocks (the receive sizes are needed on the host); the rows' all-to-all is
        left in flight (a functional collective, waited for in ``receive``), so that the caller can
        compute meanwhile: that hides the wait for a slower rank, not only the transfer.
        """
        ep, local = self.ep_size, self.num_local_experts
        send_counts = torch.tensor(counts, dtype=torch.int64, device=rows.device)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_matrix = recv_counts.view(ep, local)  # [source rank, local expert]
        send_splits = send_counts.view(ep, local).sum(1).tolist()
        recv_splits = recv_matrix.sum(1).tolist()
        in_flight = all_to_all_single_autograd(rows.contiguous(), recv_splits, send_splits, self.group)

        width = rows.shape[-1] * rows.element_size()
        self.traffic.dispatch_bytes += sum(send_splits) * width
        self.traffic.dispatch_bytes_remote += (sum(send_splits) - send_splits[self.ep_rank]) * width
        self.traffic.count_exchange_bytes += send_counts.numel() * send_counts.element_size()
        self.traffic.calls += 1
        return in_flight, recv_matrix, send_splits, recv_splits

    def receive(self, sent):
        """The rows grouped by local expert, the row count of each local expert, and the state that
        ``combine`` needs to send results back in the original order."""
        in_flight, recv_matrix, send_splits, recv_splits = sent
        received = wait_tensor(in_flight)
        # Rows arrive source-major; the experts want them expert-major.
        local = self.num_local_experts
        expert_of_row = torch.repeat_interleave(
            torch.arange(local, device=received.device).repeat(self.ep_size), recv_matrix.reshape(-1)
        )
        perm = torch.argsort(expert_of_row, stable=True)
        return received[perm], recv_matrix.sum(0).tolist(), (perm, send_splits, recv_splits)

    def combine(self, rows: torch.Tensor, state) -> torch.Tensor:
        """Send expert outputs back to the ranks their tokens came from, in their original order."""
        perm, send_splits, recv_splits = state
        source_major = torch.empty_like(rows).index_copy(0, perm, rows)
        width = rows.shape[-1] * rows.element_size()
        self.traffic.combine_bytes += sum(recv_splits) * width
        self.traffic.combine_bytes_remote += (sum(recv_splits) - recv_splits[self.ep_rank]) * width
        return _all_to_all(source_major, send_splits, recv_splits, self.group)
