"""Top-k routing, slot planning and the auxiliary router losses (docs/ARCHITECTURE.md §1.6 (router
losses)).

All functions are vectorised over tokens; nothing loops over tokens or (token, expert) slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


def router_precision(t: torch.Tensor) -> torch.Tensor:
    """The router's arithmetic: fp32 at least (bf16/fp16 logits are upcast), fp64 stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def top_k_gates(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax in fp32 (or fp64), keep the top-k probabilities as gates; return ``(probs, gates, experts)``."""
    probs = torch.softmax(router_precision(logits), dim=-1)
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
    count_tensor: kept slots per global expert, on the device (no host sync to make).
    dropped: slots dropped by the capacity limit.
    """

    order: torch.Tensor
    token_of_slot: torch.Tensor
    count_tensor: torch.Tensor
    dropped: int

    @property
    def counts(self) -> list:
        """The counts as a CPU list (the split sizes of an exchange): a host sync on a GPU, so only
        the paths that need sizes on the host read it."""
        return self.count_tensor.tolist()


def plan_slots(experts: torch.Tensor, num_experts: int, capacity_factor: Optional[float],
               counts: Optional[torch.Tensor] = None) -> SlotPlan:
    """``counts``: the slots per expert where the router counted them already (its statistics)."""
    top_k = experts.shape[-1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = slot_counts(experts, num_experts) if counts is None else counts
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
    return SlotPlan(order=order, token_of_slot=order // top_k, count_tensor=counts, dropped=dropped)


def global_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum a statistic over a group without autograd (used for counts, never for gradients)."""
    tensor = tensor.detach().clone()
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


@dataclass
class RouterStatistics:
    """What one MoE layer's forward leaves for its router losses.

    The router losses are taken over one micro-batch: ``train.micro_batch_size`` whole sequences,
    a fixed slice of the global batch that holds the same sequences at every layout (see
    ``balance_loss``). dp and ep ranks split whole sequences and tp peers hold the same ones, so a
    rank holds each of its micro-batches whole and forms its losses alone. ``slice_group`` names the
    ranks that would hold the other tokens of the same micro-batch (a layout that splits sequences,
    such as sequence or context parallelism): their counts are all-reduced over it, once per forward
    for all layers together. None today.

    slot_counts: (N,) int64, slots per expert among this rank's tokens of the micro-batch.
    tokens: routed tokens on this rank.
    prob_sums: (N,) Σ over this rank's tokens of the router probabilities (carries the gradient).
    z_sum: Σ over this rank's tokens of logsumexp(logits)², or None without a z-loss.
    """

    slot_counts: torch.Tensor
    tokens: int
    prob_sums: torch.Tensor
    z_sum: Optional[torch.Tensor]
    top_k: int
    slice_group: Optional[dist.ProcessGroup] = None


def router_statistics(
    probs: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor, with_z_loss: bool,
    slice_group: Optional[dist.ProcessGroup] = None,
) -> RouterStatistics:
    z_sum = torch.logsumexp(router_precision(logits), dim=-1).pow(2).sum() if with_z_loss else None
    return RouterStatistics(slot_counts(experts, probs.shape[-1]), experts.shape[0], probs.sum(dim=0), z_sum,
                            experts.shape[-1], slice_group)


def slot_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) int64: routed slots per expert. scatter_add, not bincount: bincount on CUDA reads the
    maximum back to the host (a sync per layer, which stalls the launch queue); the size is known."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


@dataclass
class RouterLosses:
    """One layer's router losses over one micro-batch."""

    balance: torch.Tensor
    z: Optional[torch.Tensor]
    expert_load: torch.Tensor  # slots per expert in the micro-batch


def finish_router_losses(stats: list[RouterStatistics]) -> list[RouterLosses]:
    """Form each layer's losses; where a micro-batch is split over a ``slice_group``, all-reduce the
    counts of all layers first (one collective per group; none when every rank holds its micro-batch)."""
    totals: list[Optional[tuple]] = [None] * len(stats)
    by_group: dict[int, list[int]] = {}
    for i, s in enumerate(stats):
        by_group.setdefault(id(s.slice_group), []).append(i)
    for indices in by_group.values():
        counts = torch.cat([stats[i].slot_counts for i in indices])
        tokens = torch.tensor([stats[i].tokens for i in indices], device=counts.device)
        summed = global_sum(torch.cat([counts, tokens]).double(), stats[indices[0]].slice_group)
        per_layer = summed[:counts.numel()].split([stats[i].slot_counts.numel() for i in indices])
        for k, i in enumerate(indices):
            dtype = stats[i].prob_sums.dtype
            totals[i] = (per_layer[k].to(dtype), summed[counts.numel() + k].to(dtype).clamp(min=1))
    losses = []
    for s, (counts, tokens) in zip(stats, totals):
        z = s.z_sum / tokens if s.z_sum is not None else None
        losses.append(RouterLosses(balance_loss(s.prob_sums, counts, tokens, s.top_k), z, counts))
    return losses


def balance_loss(prob_sums: torch.Tensor, counts: torch.Tensor, tokens: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch load-balancing loss ``N Σ_i f_i P̄_i`` over the tokens of one micro-batch.

    f_i = counts_i / (tokens · k), the fraction of the micro-batch's routed slots that went to
    expert i, is a constant (no gradient); P̄_i = prob_sums_i / tokens carries the gradient. The
    value is 1 at perfect balance and N when one expert takes every slot.

    Why one micro-batch of ``train.micro_batch_size`` sequences: it is a fixed slice of the global
    batch, the same sequences at every layout (the sampler cuts each rank's contiguous share of the
    global batch into micro-batches, so 1 process with gradient accumulation, dp=2, ep=2, tp=2 … see
    the same slices), and a rank that holds the slice computes its loss alone and exactly. The
    alternatives: counting over whatever the dp group holds in one round of micro-batches (this
    project's earlier rule, like Switch Transformer's per-core batch) makes the token set, and so
    the loss, depend on the number of ranks; megatron-core's ``aux_loss`` is this rule (per
    micro-batch, counts reduced only over the tp×cp ranks that share its tokens), and its
    ``global_aux_loss`` (Qiu et al. 2025, "Demons in the detail": balance over the global batch)
    reduces counts over dp and keeps a running mean across the micro-batches, which depends on the
    layout again; exact global-batch balance needs every micro-batch's routing before the first
    backward (a second forward pass). DeepSeek-V3's sequence-wise loss is layout-free too, but
    balances inside each sequence, a different and stricter target (here a sequence holds one
    task, and task-specific experts are what the mixture is for), for which the paper's
    coefficient was not chosen. With one process the micro-batch rule is what this project always
    computed, so a coefficient (the paper's 0.01) keeps its meaning.

    ``counts`` and ``tokens`` are the micro-batch's (all-reduced over its ``slice_group`` where it
    has one); ``prob_sums`` is this rank's part, so the parts of a split micro-batch sum to its loss.
    """
    num_experts = prob_sums.shape[-1]
    fraction = counts / (tokens * top_k)
    return num_experts * torch.sum(fraction * prob_sums) / tokens
