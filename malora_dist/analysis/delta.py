"""What training changed: the subspace measures (``subspaces.py``) applied to the experts' learned changes.

The present values of an expert mix what training put there with where it started: MoLoRA's A_t
and MALoRA's P_t S_A start as independent random draws, and after a short run they sit near their
start, so their similarity across experts is that of random subspaces whatever was learned. Their
step-0 values are recomputed from the run's seed (``initial_state.py``) and subtracted, per expert:

- the effective down-projection (A_t; MALoRA's P_t S_A, the product's change, not the product of
  the changes) and the up-projection (B_t, B̄_t, which start at zero, so their change is their
  value): CCA similarity between experts, with the random-subspace level of the same shapes, and
  the singular values of the concatenated changes, as ``subspaces.py`` computes them for the present;
- how far each side moved: ‖Δ‖_F / ‖X⁰‖_F over the layer's experts (none where X⁰ = 0);
- MALoRA's own factors: the coefficients P_t − P_t⁰ (rows in the d-dimensional coordinates of
  S_A; CCA between experts against the random level of r̄-dimensional subspaces of d) and the
  shared S_A − S_A⁰ (its spectrum and relative change).
"""

from __future__ import annotations

import math
from typing import Optional

from malora_dist.adapters.variant import AdapterVariant
from malora_dist.analysis.subspaces import (
    analyse_layer,
    by_projection,
    layer_experts,
    layer_prefixes,
    layer_sizes,
    mean_pairwise,
    mean_present,
    random_subspace_similarity,
    spectrum,
)
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.adapter_files import checkpoint_keys

# Per-layer numbers of the change beside analyse_layer's, averaged per projection type as they are.
CHANGE_SUMMARIES = ("change_down", "change_up", "cca_coefficients_random", "change_coefficients", "change_shared")


def relative_change(now: list, start: list) -> Optional[float]:
    """‖now − start‖_F / ‖start‖_F over the stacked matrices; None where the start is zero."""
    start_norm = math.sqrt(sum(float(s.double().square().sum()) for s in start))
    if start_norm == 0:
        return None
    return math.sqrt(sum(float((n.double() - s.double()).square().sum()) for n, s in zip(now, start))) / start_norm


def shared_projection_change(state: dict, initial: dict, prefix: str, config: AdapterConfig) -> dict:
    """MALoRA's factors: P_t (r̄ × d) per expert and the shared S_A (d × n), their changes."""
    num_experts = config.num_experts
    keys = checkpoint_keys(prefix, "expert_down", num_experts, config.method)
    coefficients = [state[k].double() - initial[k].double() for k in keys]
    (shared_key,) = checkpoint_keys(prefix, "shared_A", num_experts, config.method)
    shared = state[shared_key].double() - initial[shared_key].double()
    return {
        "cca_coefficients": mean_pairwise(coefficients, transpose=True) if num_experts > 1 else None,
        "cca_coefficients_random": (random_subspace_similarity(coefficients[0].shape[1], min(coefficients[0].shape))
                                    if num_experts > 1 else None),
        "change_coefficients": relative_change([state[k] for k in keys], [initial[k] for k in keys]),
        "spectrum_shared": spectrum(shared),
        "change_shared": relative_change([state[shared_key]], [initial[shared_key]]),
    }


def analyse_change(state: dict, initial: dict, config: AdapterConfig) -> dict:
    """Per adapted layer and per projection type, the analysis of ``state − initial``."""
    layers = {}
    for prefix in layer_prefixes(state, config.method):
        down, up = layer_experts(state, prefix, config)
        down0, up0 = layer_experts(initial, prefix, config)
        layer = analyse_layer([d - d0 for d, d0 in zip(down, down0)], [u - u0 for u, u0 in zip(up, up0)])
        layer["change_down"] = relative_change(down, down0)
        layer["change_up"] = relative_change(up, up0)
        if AdapterVariant.of(config, *layer_sizes(state, prefix, config)).has("shared_A"):  # MALoRA, HydraLoRA
            layer.update(shared_projection_change(state, initial, prefix, config))
        layers[prefix] = layer
    return {"layers": layers, "by_projection": change_by_projection(layers)}


def change_by_projection(layers: dict) -> dict:
    """``analysis.by_projection`` and, per projection type, the means of the change's own numbers."""
    summary = by_projection(layers)
    groups: dict = {}
    for prefix, layer in layers.items():
        groups.setdefault(prefix.rsplit(".", 1)[-1], []).append(layer)
    for name, members in groups.items():
        for key in CHANGE_SUMMARIES:
            if any(key in m for m in members):
                summary[name][key] = mean_present(m.get(key) for m in members)
        if any(m.get("cca_coefficients") for m in members):
            summary[name]["cca_coefficients"] = mean_present(
                (m["cca_coefficients"] or {}).get("mean") for m in members if "cca_coefficients" in m)
    return summary


def max_abs_change(state: dict, initial: dict) -> float:
    """The largest |trained − initial| entry over the tensors both hold (0.0 for an untrained adapter)."""
    return max((float((state[k].double() - v.double()).abs().max()) for k, v in initial.items()
                if k in state and v.numel()), default=0.0)

