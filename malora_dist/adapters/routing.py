"""Top-k routing, slot planning and the auxiliary router losses (DESIGN.md §1).

All functions are vectorised over tokens; nothing loops over tokens or (token, expert) slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def top_k_gates(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax in fp32, keep the top-k probabilities as gates; return ``(probs, gates, experts)``."""
    probs = torch.softmax(logits.float(), dim=-1)
    gates, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, gates, experts


@dataclass
class SlotPlan:
    """(token, expert) slots sorted by expert, so that each expert's rows are one contiguous run.

    order: indices into the flattened (T·k) slots, expert-major (stable: token order within an
        expert), with dropped slots removed.
    token_of_slot: the token each kept slot belongs to.
    counts: kept slots per global expert (a CPU list: the split sizes of the exchange).
    dropped: slots dropped by the capacity limit.
    """

    order: torch.Tensor
    token_of_slot: torch.Tensor
    counts: list
    dropped: int


def plan_slots(experts: torch.Tensor, num_experts: int, capacity_factor: Optional[float]) -> SlotPlan:
    top_k = experts.shape[-1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    dropped = 0
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * flat.numel() / num_experts)
        sorted_experts = flat[order]
        first_of_expert = torch.cumsum(counts, 0) - counts
        position_in_expert = torch.arange(flat.numel(), device=flat.device) - first_of_expert[sorted_experts]
        keep = position_in_expert < capacity
        dropped = int((~keep).sum())
        order = order[keep]
        counts = counts.clamp(max=capacity)
    return SlotPlan(order=order, token_of_slot=order // top_k, counts=counts.tolist(), dropped=dropped)


def global_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum a statistic over a group without autograd (used for counts, never for gradients)."""
    tensor = tensor.detach().clone()
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def global_routing_counts(
    experts: torch.Tensor, num_experts: int, dp_group: Optional[dist.ProcessGroup]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots per expert and routed tokens, summed over the dp group in one small all-reduce."""
    local = torch.cat([
        torch.bincount(experts.reshape(-1), minlength=num_experts),
        torch.tensor([experts.shape[0]], device=experts.device),
    ]).float()
    totals = global_sum(local, dp_group)
    return totals[:num_experts], totals[num_experts]


def balance_loss(probs: torch.Tensor, global_counts: torch.Tensor, global_tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch load-balancing loss ``N Σ_i f_i P̄_i`` over the global token set of the dp group.

    f_i comes from the all-reduced slot counts; this rank adds ``N Σ_i f_i (Σ_local p_i) / T_global``,
    so the contributions of the dp ranks sum to the single-process loss (a per-rank f_i would not).
    """
    num_experts = probs.shape[-1]
    fraction = global_counts / (global_tokens * top_k)
    return num_experts * torch.sum(fraction * probs.sum(dim=0)) / global_tokens


def z_loss(logits: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
    """Router z-loss: mean over the global tokens of ``logsumexp(logits)²``."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).sum() / global_tokens
