"""Initial values of the adapter matrices (docs/ARCHITECTURE.md §1.5 (initialisation)), as functions
of (seed, layer, part, expert).

Each draw has a generator of its own, seeded from those names, so a rank that builds only its own
experts gets exactly the values that a full build gives them, whatever the layout or the order in
which layers are built.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch


def generator_for(seed: int, layer: str, part: str, expert: Optional[int] = None) -> torch.Generator:
    """A CPU generator for one draw, keyed by (seed, layer name, part, expert)."""
    digest = hashlib.sha256(f"{seed}|{layer}|{part}|{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The init of ``nn.Linear(cols, rows).weight``: Kaiming-uniform with a=√5, i.e. U(±1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


def malora_expert_svd(shared_dim: int, in_features: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_t Σ_t, V_t)`` of the cropped SVD of one expert's Kaiming-uniform draw ``K_t`` (d×n)."""
    u, s, vh = torch.linalg.svd(kaiming_uniform(shared_dim, in_features, generator), full_matrices=False)
    return u * s, vh


def malora_shared_init(shared_dim: int, in_features: int, beta: float, seed: int, layer: str) -> torch.Tensor:
    """``S_A = β V_0`` (Eqs 8–10 of the paper, as written: every P_t is paired with expert 0's V_0,
    so P_t S_A is a Kaiming-like matrix inside span(S_A) whatever β is)."""
    return malora_expert_subspace_init(0, shared_dim, in_features, beta, seed, layer)


def malora_expert_subspace_init(expert: int, shared_dim: int, in_features: int, beta: float, seed: int,
                                layer: str) -> torch.Tensor:
    """``S_t = β V_t``: expert t's own subspace (the "no shared S_A" ablation); with the shared S_A,
    ``S_A = S_0``."""
    return beta * malora_expert_svd(shared_dim, in_features, generator_for(seed, layer, "down", expert))[1]


def malora_coefficients_init(expert: int, shared_dim: int, expert_rank: int, in_features: int, beta: float,
                             seed: int, layer: str) -> torch.Tensor:
    """``P_t = (U_t Σ_t)[:r̄] / β`` for one expert."""
    scaled_u, _ = malora_expert_svd(shared_dim, in_features, generator_for(seed, layer, "down", expert))
    return scaled_u[:expert_rank] / beta


def lora_down_init(expert: int, rank: int, in_features: int, seed: int, layer: str) -> torch.Tensor:
    """LoRA's / MoLoRA's ``A_t``: Kaiming-uniform, as ``nn.Linear`` (B is zero)."""
    return kaiming_uniform(rank, in_features, generator_for(seed, layer, "down", expert))


def identity_coefficients(num_experts: int, rank: int) -> torch.Tensor:
    """HydraLoRA's P_t: the identity, fixed, so that expert t's update is B_t A with one shared A."""
    return torch.eye(rank).expand(num_experts, rank, rank).clone()


def router_init(num_experts: int, in_features: int, seed: int, layer: str) -> torch.Tensor:
    """The router's ``W_g``: ``nn.Linear(n, N, bias=False)``'s default init."""
    return kaiming_uniform(num_experts, in_features, generator_for(seed, layer, "router"))


# MALoRA mirrored (adapter.shared_side: up): the exact transpose of MALoRA's initialisation, with the
# output size m in the place of n. MALoRA's update B̄_t P_t S_A has its per-expert high-rank factor
# B̄_t at zero and the pair P_t S_A Kaiming-like inside span(S_A); transposed, S_B P_t Ā_t has its
# per-expert high-rank factor Ā_t at zero and the pair S_B P_t Kaiming-like inside span(S_B). So the
# product starts at zero, the first gradients reach Ā_t (through the non-zero S_B P_t, different
# per expert), and β shifts the balance between S_B and P_t exactly as it does between S_A and
# P_t. The alternative (S_B = 0, as LoRA's B) would leave the per-expert parts without gradient at
# the first step and give β nothing to balance. The draws are keyed "up", apart from the down side's.
def malora_shared_up_init(shared_dim: int, out_features: int, beta: float, seed: int, layer: str) -> torch.Tensor:
    """``S_B = β V_0ᵀ`` (m×d), V_0 from the SVD of expert 0's Kaiming-uniform draw (d×m)."""
    return beta * malora_expert_svd(shared_dim, out_features, generator_for(seed, layer, "up", 0))[1].t()


def malora_up_coefficients_init(expert: int, shared_dim: int, expert_rank: int, out_features: int, beta: float,
                                seed: int, layer: str) -> torch.Tensor:
    """``P_t = ((U_t Σ_t)[:r̄])ᵀ / β`` (d×r̄) for one expert, so that S_B P_t is Kaiming-like."""
    svd = malora_expert_svd(shared_dim, out_features, generator_for(seed, layer, "up", expert))
    return svd[0][:expert_rank].t() / beta
