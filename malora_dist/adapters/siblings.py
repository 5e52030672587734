"""Adapted linears that read the same input share one expert-parallel exchange.

In a decoder block q, k and v read the same hidden states, and so do gate and up. Under expert
parallelism each adapted linear would run its own exchange (5 collectives and a host read per
micro-batch): 30 collectives per block with the usual six targets. Here they still route on their
own (each has its router, experts and statistics), but the first of them to be called with an
input runs every member's adapter on it, with **one** count exchange and one all-to-all each way
(``ExpertExchange`` with several members), and keeps the other members' updates until they are
called with that same tensor. With the six targets: 3 exchanges per block (q/k/v, gate/up, down),
15 collectives instead of 30.

Which layers are siblings is a property of the model's code, so it is named here (the Hugging Face
decoder families share these names; Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` already are one).
It is also checked at run time: a member called with a tensor other than the one its update was
computed for (another input, or the same one modified in place) runs the group again. Every rank
runs the same model code, so every rank makes the same choice and issues the same collectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from malora_dist.adapters.dispatch import AllToAllDispatch, gated_rows_into
from malora_dist.adapters.gating import plan_slots
from malora_dist.adapters.layer import AdapterLinear

SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass
class _Pending:
    source: torch.Tensor
    version: int
    updates: dict  # member → (its update, its base output or None), waiting for the member's own call


class SiblingExchange:
    def __init__(self, members: list):
        self.members = members
        self.exchange = members[0].dispatcher.exchange
        self._pending: Optional[_Pending] = None

    def forward(self, member, x: torch.Tensor, flat_x: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if pending is not None and pending.source is x and pending.version == x._version and member in pending.updates:
            update = pending.updates.pop(member)
            if not pending.updates:
                self._pending = None
            update, out = update
            return member.apply_update(update, out if out is not None else member.base_layer(flat_x))
        self._pending = None
        out, updates = self._run(member, flat_x)
        self._pending = _Pending(x, x._version, updates) if updates else None
        return out

    def _run(self, leader, flat_x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Every member's adapter on ``flat_x`` through one exchange; the leader's output (its base
        product computed while the rows travel) and the others' updates."""
        routed = [member.route(flat_x) for member in self.members]  # (z, routing, base output or None)
        plans = []
        for member, (_, routing, _) in zip(self.members, routed):
            plan = plan_slots(routing.experts, member.num_experts, member.config.capacity_factor, routing.counts)
            member.traffic.dropped_slots += plan.dropped
            plans.append(plan)
        traffic = [member.traffic for member in self.members]
        flight = self.exchange.send(plans, [z[plan.token_of_slot] for (z, _, _), plan in zip(routed, plans)], traffic)
        out = routed[self.members.index(leader)][2]
        if out is None:
            out = leader.base_layer(flat_x)  # while the rows travel
        batches = self.exchange.receive(flight, [member.dispatcher.source_major for member in self.members])
        results = [member.experts(batch, None) for member, batch in zip(self.members, batches)]
        returned = self.exchange.give_back(results, flight, traffic)
        updates = {}
        for member, (_, routing, base_out), plan, rows in zip(self.members, routed, plans, returned):
            if member is leader:  # into the base's fresh output itself, where it can
                out = member.apply_update(gated_rows_into(member.update_target(out), rows, plan, routing.gates), out,
                                          added=True)
            else:
                target = flat_x.new_zeros(flat_x.shape[0], member.update_width)
                updates[member] = (gated_rows_into(target, rows, plan, routing.gates), base_out)
        return out, updates


def exchange_members(name: str, targets) -> int:
    """How many adapted layers would share the exchange of the layer ``name`` (itself included):
    its targeted siblings (the placement cost model splits the exchange's collectives over them)."""
    leaf = name.rsplit(".", 1)[-1]
    for names in SIBLING_NAMES:
        if leaf in names:
            return max(1, len(set(names) & set(targets)))
    return 1


def group_siblings(model: nn.Module) -> int:
    """Give every set of sibling adapted linears whose experts travel by all-to-all one shared
    exchange; return the number of groups formed."""
    groups = 0
    for parent in model.modules():
        for names in SIBLING_NAMES:
            members = [getattr(parent, name, None) for name in names]
            members = [m for m in members if isinstance(m, AdapterLinear) and _exchanges(m)]
            if len(members) < 2 or any(not m.dispatcher.exchange.same_as(members[0].dispatcher.exchange)
                                       for m in members):
                continue
            group = SiblingExchange(members)
            for member in members:
                member.siblings = group
            groups += 1
    return groups


def _exchanges(layer) -> bool:
    return isinstance(layer.dispatcher, AllToAllDispatch) and layer.dispatcher.exchange.group is not None
