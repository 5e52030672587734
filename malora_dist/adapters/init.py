"""Initial values of the adapter matrices (DESIGN.md §1)."""

from __future__ import annotations

import math

import torch


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The init of ``nn.Linear(cols, rows).weight``: Kaiming-uniform with a=√5, i.e. U(±1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


def malora_svd_init(
    num_experts: int, shared_dim: int, expert_rank: int, in_features: int, beta: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(S_A, P)`` with P stacked as (N, r̄, d), by the paper's Eqs 8–10 as written.

    Each expert draws ``K_t`` (d×n), cropped SVD ``K_t = U_t Σ_t V_t``; ``P_t = (U_t Σ_t)[:r̄] / β``
    and ``S_A = β V_0``, so that ``P_t S_A`` is a Kaiming-like matrix inside span(S_A) whatever β is.
    """
    coefficients = []
    shared = None
    for t in range(num_experts):
        k_t = kaiming_uniform(shared_dim, in_features, generator)
        u, s, vh = torch.linalg.svd(k_t, full_matrices=False)
        coefficients.append((u * s)[:expert_rank] / beta)
        if t == 0:
            shared = beta * vh
    return shared, torch.stack(coefficients)
