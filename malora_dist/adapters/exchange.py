"""How routed rows reach their experts and come back.

``LocalExchange`` serves a layer that holds all its experts. The expert-parallel all-to-all
exchange (``malora_dist.parallel.expert_exchange``) has the same two calls, so the layer's code does
not change with the placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrafficCounter:
    """Bytes handed to the all-to-all per direction (own rows included, so the closed form is exact),
    and the share of them that leaves this rank."""

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


class LocalExchange:
    """All experts are on this rank: the sorted rows are the local experts' rows.

    The dispatch has two halves, ``send`` and ``receive``, so that the layer can compute what does
    not depend on the experts (the frozen base's product) while rows are in flight.
    """

    def __init__(self):
        self.traffic = TrafficCounter()

    def send(self, rows: torch.Tensor, counts: list) -> tuple[torch.Tensor, list]:
        return rows, counts

    def receive(self, sent: tuple[torch.Tensor, list]) -> tuple[torch.Tensor, list, None]:
        rows, counts = sent
        return rows, counts, None

    def combine(self, rows: torch.Tensor, state: None) -> torch.Tensor:
        return rows
