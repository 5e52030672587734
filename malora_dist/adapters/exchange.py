"""The expert-parallel exchange: rows out to their experts' owners and back, for one adapted linear or
for several that read the same input (q/k/v; gate/up) at once.

The FastMoE protocol on ``torch.distributed``: exchange the per-expert row counts, then the rows with
uneven splits, and the experts' results back the same way. Several layers ("members") share one
exchange: their counts travel in one ``all_to_all_single`` (a [destination rank, member, local
expert] tensor), their rows in one all-to-all each way (each destination's rows of every member
packed one after the other in a flat buffer, so members may differ in width, as q's and k's outputs
do under grouped-query attention). The split sizes reach the host in **one** read per exchange
(rows sent and received per member and rank, rows per local expert), not one per list. Per exchange,
whatever the number of members: 3 collectives forward (counts, rows out, rows back) and the rows'
2 backward mirrors, and 1 host read.

Received rows arrive source-major; ``receive`` sorts a member's rows into expert-major order for
experts that want one group per expert (the reference parts) and leaves them as they are for the
fused grouped experts, which take the ep × E (source, expert) groups directly (``RowBatch.sources``).

Every rank issues the same collectives in the same order whether or not it has rows; ``group`` None
(with ep_size 1) runs the same local steps without communication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from malora_dist.adapters.gating import SlotPlan

# count exchange, rows out, rows back (forward), and the rows' two backward mirrors
COLLECTIVES_PER_EXCHANGE = 5


@dataclass
class TrafficCounter:
    """Bytes handed to the all-to-all per direction (own rows included, so the closed form is exact),
    the share of them that leaves this rank, slots dropped by the capacity limit, and the exchanges,
    collectives and host reads this layer led (a member of a shared exchange counts only its bytes)."""

    dispatch_bytes: int = 0
    combine_bytes: int = 0
    dispatch_bytes_remote: int = 0
    combine_bytes_remote: int = 0
    count_exchange_bytes: int = 0
    calls: int = 0
    dropped_slots: int = 0
    exchanges: int = 0
    collectives: int = 0
    host_reads: int = 0

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RowBatch:
    """Rows grouped by local expert, and the row count of each group, on the device
    (``count_tensor``) and, where the host already has them, as a list (``host_counts``).

    sources: 1 — one group per local expert (expert-major); s > 1 — the rows as they arrived from
    the s ranks of the exchange, source-major: group g holds source g // E's rows for local expert
    g % E (E local experts), so an experts kernel that takes groups in that order needs no
    permutation of the rows either way."""

    rows: torch.Tensor
    count_tensor: torch.Tensor
    host_counts: Optional[list] = None
    sources: int = 1

    @property
    def counts(self) -> list:
        return self.host_counts if self.host_counts is not None else self.count_tensor.tolist()


@dataclass
class InFlight:
    """An exchange between ``send`` and ``give_back``: per member, rows sent to / received from each
    rank, the received counts [source rank, local expert], and the rows' expert-major order."""

    rows: object  # the received buffer, or the collective's handle while it travels
    send_splits: list
    recv_splits: list
    local_counts: list
    group_counts: list  # per member, received rows per (source rank, local expert), source-major
    recv_matrix: torch.Tensor  # (ep, members, local experts)
    widths: list
    perms: list = field(default_factory=list)  # per member, its expert-major order (None: kept source-major)


class ExpertExchange:
    def __init__(self, group: Optional[dist.ProcessGroup], ep_size: int, ep_rank: int, num_experts: int):
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // ep_size

    def same_as(self, other: "ExpertExchange") -> bool:
        return (self.group, self.ep_size, self.ep_rank, self.num_experts) == (
            other.group, other.ep_size, other.ep_rank, other.num_experts)

    def send(self, plans: list[SlotPlan], rows: list[torch.Tensor], traffic: list[TrafficCounter]) -> InFlight:
        """Start sending each member's rows (sorted by global expert) to their experts' owners. The
        count exchange blocks (the receive sizes are needed on the host); the rows' all-to-all is left
        in flight (a functional collective, waited for in ``receive``): that hides the wait for a
        slower rank, not only the transfer."""
        ep, local, members = self.ep_size, self.num_local_experts, len(plans)
        send_counts = torch.stack([p.count_tensor.view(ep, local) for p in plans], 1)  # [dest, member, expert]
        recv_counts = torch.empty_like(send_counts)
        if self.group is None:
            recv_counts.copy_(send_counts)
        else:
            dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # every size the exchange needs on the host, in one read
        sizes = torch.cat([send_counts.sum(2).t().reshape(-1), recv_counts.sum(2).t().reshape(-1),
                           recv_counts.sum(0).reshape(-1), recv_counts.transpose(0, 1).reshape(-1)]).tolist()
        per_rank = [sizes[i * ep:(i + 1) * ep] for i in range(2 * members)]
        send_splits, recv_splits = per_rank[:members], per_rank[members:]
        offset = 2 * members * ep
        local_counts = [sizes[offset + s * local:offset + (s + 1) * local] for s in range(members)]
        offset += members * local
        group_counts = [sizes[offset + s * ep * local:offset + (s + 1) * ep * local] for s in range(members)]
        widths = [r.shape[-1] for r in rows]
        buffer = self._all_to_all(_pack(rows, send_splits, ep), _sizes(recv_splits, widths, members),
                                  _sizes(send_splits, widths, members))

        for s, counter in enumerate(traffic):
            width = widths[s] * rows[s].element_size()
            counter.dispatch_bytes += sum(send_splits[s]) * width
            counter.dispatch_bytes_remote += (sum(send_splits[s]) - send_splits[s][self.ep_rank]) * width
            counter.count_exchange_bytes += plans[s].count_tensor.numel() * send_counts.element_size()
            counter.calls += 1
        traffic[0].exchanges += 1
        traffic[0].collectives += COLLECTIVES_PER_EXCHANGE if self.group is not None else 0
        traffic[0].host_reads += 1
        return InFlight(buffer, send_splits, recv_splits, local_counts, group_counts, recv_counts, widths)

    def receive(self, flight: InFlight, source_major: Optional[list] = None) -> list[RowBatch]:
        """Each member's received rows: expert-major (they arrive source-major, and are sorted), or
        as they arrived for the members whose ``source_major`` entry is true (experts that take the
        ep × E groups in that order: ``fused_experts``)."""
        received = wait_tensor(flight.rows) if self.group is not None else flight.rows
        batches = []
        for s, rows in enumerate(_unpack(received, flight.recv_splits, flight.widths, self.ep_size)):
            counts = flight.recv_matrix[:, s].reshape(-1)
            if source_major is not None and source_major[s] and self.ep_size > 1:
                flight.perms.append(None)
                batches.append(RowBatch(rows, counts, flight.group_counts[s], sources=self.ep_size))
                continue
            expert_of_row = torch.repeat_interleave(  # output_size: no host sync on a GPU
                torch.arange(self.num_local_experts, device=rows.device).repeat(self.ep_size), counts,
                output_size=rows.shape[0])
            perm = torch.argsort(expert_of_row, stable=True)
            flight.perms.append(perm)
            local = flight.recv_matrix[:, s].sum(0)
            batches.append(RowBatch(rows[perm], local, flight.local_counts[s]))
        return batches

    def give_back(self, results: list[torch.Tensor], flight: InFlight,
                  traffic: list[TrafficCounter]) -> list[torch.Tensor]:
        """Send each member's expert outputs back to the ranks their tokens came from; each member's
        rows return in the order it sent them."""
        source_major = [r if perm is None else torch.empty_like(r).index_copy(0, perm, r)
                        for r, perm in zip(results, flight.perms)]
        widths = [r.shape[-1] for r in results]
        for s, counter in enumerate(traffic):
            width = widths[s] * results[s].element_size()
            counter.combine_bytes += sum(flight.recv_splits[s]) * width
            counter.combine_bytes_remote += (sum(flight.recv_splits[s]) - flight.recv_splits[s][self.ep_rank]) * width
        members = len(results)
        back = self._all_to_all(_pack(source_major, flight.recv_splits, self.ep_size),
                                _sizes(flight.send_splits, widths, members),
                                _sizes(flight.recv_splits, widths, members))
        back = wait_tensor(back) if self.group is not None else back
        return _unpack(back, flight.send_splits, widths, self.ep_size)

    def _all_to_all(self, t: torch.Tensor, output_splits: list, input_splits: list):
        if self.group is None:
            return t
        return all_to_all_single_autograd(t.contiguous(), output_splits, input_splits, self.group)


# One member travels as its 2-D rows (split sizes in rows); several as one flat buffer, destination
# by destination (split sizes in numbers), so that their widths may differ.
def _pack(rows: list[torch.Tensor], splits: list[list], ep: int) -> torch.Tensor:
    if len(rows) == 1:
        return rows[0]
    chunks = [r.split(s) for r, s in zip(rows, splits)]
    return torch.cat([chunks[s][rank].reshape(-1) for rank in range(ep) for s in range(len(rows))])


def _sizes(splits: list[list], widths: list, members: int) -> list:
    if members == 1:
        return splits[0]
    return [sum(splits[s][rank] * widths[s] for s in range(members)) for rank in range(len(splits[0]))]


def _unpack(buffer: torch.Tensor, splits: list[list], widths: list, ep: int) -> list[torch.Tensor]:
    if len(widths) == 1:
        return [buffer]
    members = len(widths)
    pieces = buffer.split([splits[s][rank] * widths[s] for rank in range(ep) for s in range(members)])
    return [torch.cat([pieces[rank * members + s].view(-1, widths[s]) for rank in range(ep)]) for s in range(members)]
