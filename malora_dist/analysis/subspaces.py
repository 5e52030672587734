"""The subspace measures of the analysis: the CCA similarity between experts' subspaces (the mean
canonical correlation, i.e. the cosines of the principal angles), singular-value spectra with their
effective rank, and what independent random subspaces of the same shapes show."""

from __future__ import annotations

import functools
from itertools import combinations
from typing import Optional

import torch

from malora_dist.adapters.variant import AdapterVariant
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.adapter_files import checkpoint_keys

# Singular values below this fraction of the largest span no direction (B̄ = 0 at init spans none).
RANK_TOLERANCE = 1e-6


def subspace_basis(matrix: torch.Tensor) -> Optional[torch.Tensor]:
    """An orthonormal basis (columns) of the column space of ``matrix``, or None if it is zero."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return None
    return u[:, s > RANK_TOLERANCE * s[0]]


def canonical_correlations(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """Canonical correlations between the column spaces of ``a`` and ``b`` (descending)."""
    qa, qb = subspace_basis(a), subspace_basis(b)
    if qa is None or qb is None:
        return None
    return torch.linalg.svdvals(qa.t() @ qb).clamp(max=1.0)


def cca_similarity(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Mean canonical correlation of two column spaces; None where either matrix is zero."""
    correlations = canonical_correlations(a, b)
    return None if correlations is None else float(correlations.mean())


def effective_rank(singular_values: torch.Tensor) -> float:
    p = singular_values / singular_values.sum().clamp(min=1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def layer_sizes(state: dict, prefix: str, config: AdapterConfig) -> tuple[int, int]:
    """(n, m) of one adapted layer, read off its tensors under checkpoint keys: LoRA's A (r × n) and
    B (m × r); a mixture's router (N × n) and its output side, S_B (m × d) where the shared subspace
    is on the up side, else B_t (m × r)."""
    keys = functools.partial(checkpoint_keys, prefix, num_experts=1, method=config.method)
    if config.method == "lora":
        return state[keys("expert_down")[0]].shape[1], state[keys("expert_up")[0]].shape[0]
    up = state.get(keys("shared_B")[0], state[keys("expert_up")[0]])
    return state[keys("router.weight")[0]].shape[1], up.shape[0]


def layer_experts(state: dict, prefix: str, config: AdapterConfig) -> tuple[list, list]:
    """(down, up) per expert of one layer, in float64: down (r × n) rows in the input space, up (m × r),
    each the product of its variant's factors (``down_factors``, ``up_factors``): MoLoRA's A_t and
    B_t; MALoRA's P_t S_A and B̄_t (HydraLoRA: P_t = I); P_t S_t with per-expert subspaces; Ā_t and
    S_B P_t with the shared subspace on the up side."""
    variant = AdapterVariant.of(config, *layer_sizes(state, prefix, config))
    tensors = {}
    for part in variant.parts:
        if part.name not in variant.down_factors + variant.up_factors:
            continue
        keys = checkpoint_keys(prefix, part.name, variant.num_experts, config.method)
        values = [state[k].double() for k in keys]
        shape = part.shape[1:] if part.per_expert else part.shape
        if any(tuple(v.shape) != shape for v in values):
            raise ValueError(f"{prefix}.{part.name}: the state holds {tuple(values[0].shape)}, where the "
                             f"{config.method} variant holds {shape}")
        tensors[part.name] = values if part.per_expert else values * variant.num_experts

    def product(factors: tuple, t: int) -> torch.Tensor:
        return functools.reduce(torch.matmul, [tensors[name][t] for name in factors])

    experts = range(variant.num_experts)
    return [product(variant.down_factors, t) for t in experts], [product(variant.up_factors, t) for t in experts]


def layer_prefixes(state: dict, method: str) -> list[str]:
    if method == "lora":
        return sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    return sorted({k.rsplit(".experts.", 1)[0] for k in state if ".experts." in k})


def mean_pairwise(matrices: list, transpose: bool) -> dict:
    """Mean CCA similarity over pairs of experts, and the full matrix (None where undefined)."""
    n = len(matrices)
    table = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    values = []
    for i, j in combinations(range(n), 2):
        a, b = (matrices[i].t(), matrices[j].t()) if transpose else (matrices[i], matrices[j])
        value = cca_similarity(a, b)
        table[i][j] = table[j][i] = value
        if value is not None:
            values.append(value)
    return {"mean": sum(values) / len(values) if values else None, "pairs": table}


# Draws per shape for the random-subspace baseline: its mean is steady to about ±0.005 at 32.
RANDOM_BASELINE_DRAWS = 32


@functools.lru_cache(maxsize=None)
def random_subspace_similarity(ambient: int, dim: int) -> float:
    """The CCA similarity two independent random ``dim``-dimensional subspaces of an
    ``ambient``-dimensional space have on average (seeded Monte Carlo): the level a pair of experts
    shows with no shared direction learned (MoLoRA's A_t at their random initialisation sit near it)."""
    generator = torch.Generator().manual_seed(ambient * 100_003 + dim)
    draws = [cca_similarity(torch.randn(ambient, dim, generator=generator, dtype=torch.float64),
                            torch.randn(ambient, dim, generator=generator, dtype=torch.float64))
             for _ in range(RANDOM_BASELINE_DRAWS)]
    return sum(draws) / len(draws)


def spectrum(matrix: torch.Tensor) -> dict:
    values = torch.linalg.svdvals(matrix.double())
    return {"singular_values": values.tolist(), "effective_rank": effective_rank(values)}


def analyse_layer(down: list, up: list) -> dict:
    """CCA between the experts of one layer (down_t: r × n, up_t: m × r), its random level, spectra."""
    return {
        # rows of down_t span a subspace of the input space: compare the columns of down_tᵀ
        "cca_down": mean_pairwise(down, transpose=True) if len(down) > 1 else None,
        "cca_up": mean_pairwise(up, transpose=False) if len(up) > 1 else None,
        # what independent random subspaces of the experts' shapes would give
        "cca_down_random": random_subspace_similarity(down[0].shape[1], min(down[0].shape)) if len(down) > 1 else None,
        "cca_up_random": random_subspace_similarity(up[0].shape[0], min(up[0].shape)) if len(up) > 1 else None,
        "spectrum_down": spectrum(torch.cat(down, dim=0)),
        "spectrum_up": spectrum(torch.cat(up, dim=1)),
    }


def analyse_state(state: dict, config: AdapterConfig) -> dict:
    layers = {prefix: analyse_layer(*layer_experts(state, prefix, config))
              for prefix in layer_prefixes(state, config.method)}
    num_experts = config.num_experts if config.is_moe else 1
    return {"method": config.method, "num_experts": num_experts, "layers": layers,
            "by_projection": by_projection(layers)}


def mean_present(values) -> Optional[float]:
    """The mean of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def by_projection(layers: dict) -> dict:
    """Per projection type (the name's last part), the mean over layers of each summary."""
    groups: dict = {}
    for prefix, layer in layers.items():
        groups.setdefault(prefix.rsplit(".", 1)[-1], []).append(layer)
    out = {}
    for name, members in sorted(groups.items()):
        out[name] = {
            "cca_down": mean_present([m["cca_down"]["mean"] if m["cca_down"] else None for m in members]),
            "cca_up": mean_present([m["cca_up"]["mean"] if m["cca_up"] else None for m in members]),
            "cca_down_random": mean_present([m["cca_down_random"] for m in members]),
            "cca_up_random": mean_present([m["cca_up_random"] for m in members]),
            "effective_rank_down": mean_present([m["spectrum_down"]["effective_rank"] for m in members]),
            "effective_rank_up": mean_present([m["spectrum_up"]["effective_rank"] for m in members]),
            "layers": len(members),
        }
    return out
