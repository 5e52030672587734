"""The initial values of a layer's parts for this rank's experts, each drawn as its ``Part.init`` says.

The draws are ``init.py``'s functions of (seed, layer name, part, expert), so a rank that builds only
its own experts gets exactly the values a full build gives them.
"""

from __future__ import annotations

import torch

from malora_dist.adapters.init import (
    identity_coefficients,
    lora_down_init,
    malora_coefficients_init,
    malora_expert_subspace_init,
    malora_shared_init,
    malora_shared_up_init,
    malora_up_coefficients_init,
    router_init,
)
from malora_dist.adapters.variant import AdapterVariant
from malora_dist.config.adapter import AdapterConfig

# DoRA's magnitude starts at ‖W0‖, which its part computes from the base (dora.py).
FROM_THE_BASE = "base_norms"


def initial_values(variant: AdapterVariant, config: AdapterConfig, local: range, seed: int, name: str,
                   on_meta: bool = False) -> dict:
    """{part name: full-width tensor (before tensor-parallel slicing) of this rank's ``local`` experts};
    ``on_meta``: shapes only, for a skeleton (export, parameter counts)."""
    n, m, d, rank, beta = variant.n, variant.m, variant.d, variant.rank, config.beta
    # identical_init: every expert draws as expert 0 does
    draws = [0] * len(local) if config.identical_init else list(local)
    per_expert = {
        "lora_down": lambda t: lora_down_init(t, rank, n, seed, name),
        "malora_coefficients": lambda t: malora_coefficients_init(t, d, rank, n, beta, seed, name),
        "malora_expert_subspace": lambda t: malora_expert_subspace_init(t, d, n, beta, seed, name),
        "malora_up_coefficients": lambda t: malora_up_coefficients_init(t, d, rank, m, beta, seed, name),
    }
    whole = {
        "router": lambda: router_init(variant.num_experts, n, seed, name),
        "malora_shared": lambda: malora_shared_init(d, n, beta, seed, name),
        "lora_down_shared": lambda: lora_down_init(0, rank, n, seed, name),  # HydraLoRA's one A, drawn as LoRA's
        "malora_shared_up": lambda: malora_shared_up_init(d, m, beta, seed, name),
        "identity": lambda: identity_coefficients(len(local), rank),
    }
    values = {}
    for part in variant.parts:
        shape = part.local_shape(len(local))
        if part.init == FROM_THE_BASE:
            continue
        if on_meta:
            values[part.name] = torch.empty(shape, device="meta")
        elif part.init == "zeros":
            values[part.name] = torch.zeros(shape)
        elif part.init in per_expert:
            values[part.name] = torch.stack([per_expert[part.init](t) for t in draws])
        else:
            values[part.name] = whole[part.init]()
    return values
