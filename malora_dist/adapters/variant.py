"""One description of an adapter variant, derived from the config in one place.

``AdapterVariant.of(config, n, m)`` says, for an adapted linear of n inputs and m outputs, which
parts the layer holds and what every reader of those parts needs to know about them, so that no
reader works it out again from the config's keys:

- the layer (``layer.py``; DoRA's ``dora.py``) builds, initialises, tags and freezes its parts from
  ``parts``, and ``layer_class.py`` picks the class that runs ``forward``;
- the adapter files (``file_format.py``, ``parallel/adapter_files.py``) name each tensor after its
  part's ``name`` and ``path`` and check the file's tensor against the part's full ``shape``;
- the placement costs (``parallel/placement.py``) price ``sent_width`` / ``returned_width`` per
  routed slot and the trainable numbers of one expert;
- the analysis (``analysis/subspaces.py``) composes each expert's down- and up-projection from
  ``down_factors`` / ``up_factors``.

The variants (docs/ARCHITECTURE.md §1 (math)); experts stacked on dim 0, N = 1 for LoRA; per routed
slot, what is sent → what comes back:

- lora: A (1, r, n), B (1, m, r); n → m; forward plain, or dora with DoRA's magnitude (m,);
- molora: A_t (N, r, n), B_t (N, m, r), router W_g (N, n); n → m;
- malora: P_t (N, r̄, d), B̄_t (N, m, r̄), S_A (d, n), W_g; d → m (S_A x travels);
- malora, ``subspace: per_expert``: P_t, B̄_t, S_t (N, d, n), W_g; n → m;
- malora, ``shared_side: up``: Ā_t (N, r̄, n), P_t (N, d, r̄), S_B (m, d), W_g; n → d; forward
  shared_up (S_B once per token, after the experts' gated sum);
- hydralora: P_t = I (N, r, r) frozen, B_t (N, m, r), one shared A (r, n), W_g; d = r → m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from malora_dist.config.adapter import AdapterConfig

# Every part a variant can hold: its name (``adapter_tensors``, checkpoint and file keys) and its
# parameter's attribute path in the layer (the layer's state dict, PEFT's, and so the mixture files).
PART_PATHS = {"expert_down": "experts.down", "expert_up": "experts.up", "expert_subspace": "experts.subspace",
              "shared_A": "shared.weight", "shared_B": "shared_up.weight", "router.weight": "router.weight",
              "magnitude": "dora.weight"}
# The parts stacked per expert on dim 0 (by global index in files, local index in a layer).
PER_EXPERT_PARTS = ("expert_down", "expert_up", "expert_subspace")

# The forward kinds: the routed experts added into the base's output; DoRA's magnitude rescaling
# base and update together; the experts' d-vectors combined per token, then S_B applied once.
PLAIN, DORA, SHARED_UP = "plain", "dora", "shared_up"


@dataclass(frozen=True)
class Part:
    """One parameter of the layer.

    name: the part's name (``PART_PATHS``); shape: its full shape, experts stacked on dim 0 for a
    per-expert part; split: the size tensor parallelism splits — ``n`` under a row-parallel base
    (the part contracts x's features), ``m`` under a column-parallel base (it produces output
    features), None (replicated over tp); frozen: kept at its initial value; init: how its initial
    value is drawn (``initial_values.py``; ``base_norms``: DoRA's ‖W0‖, computed by its part).
    """

    name: str
    shape: tuple
    split: Optional[str]
    frozen: bool
    init: str

    @property
    def path(self) -> str:
        return PART_PATHS[self.name]

    @property
    def per_expert(self) -> bool:
        return self.name in PER_EXPERT_PARTS

    def local_shape(self, local_experts: int) -> tuple:
        """The shape a rank holding ``local_experts`` of the experts allocates (before tp slicing)."""
        return (local_experts, *self.shape[1:]) if self.per_expert else self.shape

    def tp_dim(self, mode: Optional[str]) -> Optional[int]:
        """The dim a base of tensor-parallel ``mode`` (None, ``row`` or ``column``) splits."""
        if (mode, self.split) == ("row", "n"):
            return -1  # every part that reads x holds n last
        if (mode, self.split) == ("column", "m"):
            return -2 if len(self.shape) > 1 else 0  # (…, m, cols) matrices; DoRA's (m,) magnitude
        return None

    @property
    def numbers_per_expert(self) -> int:
        return math.prod(self.shape[1:]) if self.per_expert else 0


@dataclass(frozen=True)
class AdapterVariant:
    """What an adapted linear holds and does (see the module's table).

    num_experts, top_k: N and k (1 and 1 for LoRA: one expert, no router); rank: the rank of one
    expert's update (r̄ or r); d: the subspace dimension (None without one); parts: in the order of
    ``adapter_tensors``; forward: PLAIN, DORA or SHARED_UP; sent_width / returned_width: numbers per
    routed slot sent to its expert and coming back; down_factors / up_factors: the parts whose
    product (left to right, per-expert parts at the expert's index) is an expert's down-projection
    (rank × n) and up-projection (m × rank).
    """

    method: str
    n: int
    m: int
    num_experts: int
    top_k: int
    rank: int
    d: Optional[int]
    parts: tuple
    forward: str
    sent_width: int
    returned_width: int
    down_factors: tuple
    up_factors: tuple

    @classmethod
    def of(cls, config: AdapterConfig, n: int, m: int) -> "AdapterVariant":
        num = config.num_experts if config.is_moe else 1
        rank, frozen = config.adapter_rank, config.frozen_parts
        d = config.d if config.has_subspace else None

        def part(name, shape, split, init):
            return Part(name, (num, *shape) if name in PER_EXPERT_PARTS else shape, split, name in frozen, init)

        up = part("expert_up", (m, rank), "m", "zeros")  # B_t, B̄_t: zero, so the layer starts as the base
        down_factors, up_factors = ("expert_down",), ("expert_up",)
        sent, returned = n, m
        if config.has_shared_up:  # S_B P_t Ā_t: Ā_t at zero, S_B P_t Kaiming-like (init.py)
            parts = [part("expert_down", (rank, n), "n", "zeros"),
                     part("expert_up", (d, rank), None, "malora_up_coefficients"),
                     part("shared_B", (m, d), "m", "malora_shared_up")]
            up_factors, returned = ("shared_B", "expert_up"), d  # S_B applies after the experts' sum
        elif config.method == "malora" and config.subspace == "per_expert":  # B̄_t P_t S_t: x travels
            parts = [part("expert_down", (rank, d), None, "malora_coefficients"), up,
                     part("expert_subspace", (d, n), "n", "malora_expert_subspace")]
            down_factors = ("expert_down", "expert_subspace")
        elif config.has_subspace:  # B̄_t P_t S_A (HydraLoRA: B_t I A, d = r̄ = r): S_A x travels
            coefficients = "identity" if config.method == "hydralora" else "malora_coefficients"
            shared = "lora_down_shared" if config.method == "hydralora" else "malora_shared"
            parts = [part("expert_down", (rank, d), None, coefficients), up,
                     part("shared_A", (d, n), "n", shared)]
            down_factors, sent = ("expert_down", "shared_A"), d
        else:  # B_t A_t
            parts = [part("expert_down", (rank, n), "n", "lora_down"), up]
        if config.is_moe:
            parts.append(part("router.weight", (num, n), "n", "router"))
        if config.dora:
            parts.append(part("magnitude", (m,), "m", "base_norms"))
        return cls(method=config.method, n=n, m=m, num_experts=num, top_k=config.top_k if config.is_moe else 1,
                   rank=rank, d=d, parts=tuple(parts), forward=forward_kind(config), sent_width=sent,
                   returned_width=returned, down_factors=down_factors, up_factors=up_factors)

    @property
    def names(self) -> tuple:
        return tuple(p.name for p in self.parts)

    def has(self, name: str) -> bool:
        return name in self.names

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"the {self.method} variant has no part {name!r}; its parts are {list(self.names)}")

    @property
    def routed(self) -> bool:
        """A router picks top_k of the N experts per token (LoRA's one expert takes every token)."""
        return self.has("router.weight")

    @property
    def contracts_n(self) -> bool:
        """The experts' down-projection reads x itself (A_t, Ā_t), so under a row-parallel base it
        holds a slice of n and its product is a partial sum; P_t reads the d-wide S x."""
        return self.part("expert_down").split == "n"

    @property
    def trainable_numbers_per_expert(self) -> int:
        """Numbers of one expert whose gradients are reduced (frozen parts have none)."""
        return sum(p.numbers_per_expert for p in self.parts if not p.frozen)


def forward_kind(config: AdapterConfig) -> str:
    """The forward an adapted linear of ``config`` runs (``layer_class.py`` picks its class by it)."""
    if config.dora:
        return DORA
    return SHARED_UP if config.has_shared_up else PLAIN
