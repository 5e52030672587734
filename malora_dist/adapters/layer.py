"""One adapter layer family around a frozen linear: LoRA, MoLoRA and MALoRA (docs/ARCHITECTURE.md
§1 (math), §2 (layer parts)).

``y = base(x) + scaling · Σ_{t ∈ topk} g_t · up_t(down_t(shared(drop(x))))``, built from parts with
one job each, chosen once, when the layer is built for its layout:

- ``shared`` (``SharedProjection``): router logits and the adapter's input (MALoRA's S_A x);
- ``router`` (``TopKRouter``; LoRA's ``SingleExpert``): top-k experts, gates, routing statistics;
- ``dispatcher``: local dense, local grouped rows, or all-to-all over the EP group;
- ``experts`` (``DenseExperts`` | ``GroupedExperts``): this rank's experts only;
- ``shared_up`` (``SharedUpProjection``, ``adapter.shared_side: up`` only): MALoRA's shared
  subspace mirrored to the up side, applied once per token to the experts' combined d-vectors.

The layer wraps ``base_layer`` (an ``nn.Linear`` or a tensor-parallel base from
``malora_dist.models``, whose ``parallel_mode`` picks the tensor-parallel mappings) and never
changes its weights. A rank allocates only its experts, with exactly the values a full build would
give them (initialisation is a function of (seed, layer name, expert)), so losses do not depend on
the layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from malora_dist.adapters.accumulate import add_into
from malora_dist.adapters.dispatch import AllToAllDispatch, DenseBatch, DenseDispatch, GroupedDispatch
from malora_dist.adapters.dora import DoraMagnitude
from malora_dist.adapters.dropout import LayoutFreeDropout
from malora_dist.adapters.experts import DenseExperts, GroupedExperts
from malora_dist.adapters.fused import WeightCache, fused_layer_forward, use_fused
from malora_dist.adapters.fused_experts import FusedGroupedExperts
from malora_dist.adapters.fused_route import fused_route, prepare_route_weights
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
from malora_dist.adapters.layout import SINGLE_PROCESS, AdapterLayout
from malora_dist.adapters.projection import SharedProjection
from malora_dist.adapters.router import SingleExpert, TopKRouter
from malora_dist.adapters.shared_up import SharedUpProjection
from malora_dist.adapters.subspace_experts import DenseSubspaceExperts, GroupedSubspaceExperts
from malora_dist.adapters.tags import tag
from malora_dist.adapters.tensor_parallel import TensorParallelHooks
from malora_dist.config.adapter import AdapterConfig


def expert_kernel(config: AdapterConfig, experts_split: bool) -> str:
    """``dense`` or ``sparse`` (rows grouped per expert) for this layer: see AdapterConfig.expert_kernel.
    Experts split over ranks receive rows, so they are always grouped."""
    if not config.is_moe:
        return "dense"
    if experts_split or config.expert_kernel == "sparse":
        return "sparse"
    return "dense" if config.expert_kernel == "dense" or config.dense_by_default else "sparse"


class AdapterLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "",
                 layout: AdapterLayout = SINGLE_PROCESS, seed: int = 0):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.config = config
        self.name = name
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        config.check_fits(self.in_features, name, self.out_features)
        hooks = TensorParallelHooks(getattr(base_layer, "parallel_mode", None), getattr(base_layer, "tp_group", None))
        self.num_experts = config.num_experts if config.is_moe else 1
        self.top_k = config.top_k if config.is_moe else 1
        self.scaling = config.scaling
        local = layout.local_experts(self.num_experts)
        self.expert_offset = local.start
        self.expert_load: Optional[torch.Tensor] = None  # slots per expert in the last micro-batch (auxiliary_loss)
        self.kernel = expert_kernel(config, layout.experts_split)
        values = _initial_values(config, self.in_features, self.out_features, local, seed, name,
                                 on_meta=getattr(getattr(base_layer, "weight", None), "device", None) == torch.device("meta"))
        n_dim, m_dim = hooks.split_dim("n"), hooks.split_dim("m")
        malora = config.has_shared_projection  # S_A before routing (malora, hydralora)
        split = layout.experts_split
        # the fused Functions where they implement this layer (adapter.kernel): one for the whole layer
        # with dense experts, two around the rows' exchange with grouped ones (fused_route,
        # fused_experts); the parts below stay the parameters' owners and the reference path
        fused = use_fused(config, layout, base_layer, hooks.mode is not None, self.kernel, name)

        self.shared = SharedProjection(None if not malora else hooks.shard(values["shared"], n_dim),
                                       LayoutFreeDropout(config.dropout, name), hooks)
        if self.shared.weight is not None:
            tag(self.shared.weight, expert=False, tp_dim=n_dim)
        shared_up = config.has_shared_up  # S_B after the experts: they hold Ā_t (r̄, n) and P_t (d, r̄)
        # With S_B after them, the gates and the experts enter no sharded matrix: the one tp copy is S_B's
        routed_hooks = hooks.for_replicated_up() if shared_up else hooks
        if config.is_moe:
            self.router = TopKRouter(hooks.shard(values["router"], n_dim), config.top_k, config.normalize_gates,
                                     config.router_z_loss_coef > 0, config.scaling, routed_hooks, layout.slice_group)
            tag(self.router.weight, expert=False, tp_dim=n_dim)
        else:
            self.router = SingleExpert()
        down_dim = None if config.has_subspace and not shared_up else n_dim  # P_t (r̄, d) or A_t, Ā_t (r, n)
        up_dim = None if shared_up else m_dim  # B_t, B̄_t (m, r), or shared_up's P_t (d, r̄): replicated
        experts_args = (hooks.shard(values["down"], down_dim), hooks.shard(values["up"], up_dim), not malora,
                        routed_hooks)
        per_expert = values.get("subspace") is not None  # adapter.subspace: per_expert
        if per_expert:
            experts_args = experts_args[:2] + (hooks.shard(values["subspace"], n_dim), hooks)
        if self.kernel == "dense":
            self.experts = (DenseSubspaceExperts if per_expert else DenseExperts)(*experts_args, scaling=config.scaling)
            self.dispatcher = DenseDispatch(self.num_experts)
        else:
            grouped = GroupedSubspaceExperts if per_expert else FusedGroupedExperts if fused else GroupedExperts
            self.experts = grouped(*experts_args)
            self.dispatcher = (AllToAllDispatch(self.num_experts, config.capacity_factor, layout.ep_group,
                                                layout.ep_size, layout.ep_rank, source_major=fused)
                               if split else GroupedDispatch(self.num_experts, config.capacity_factor))
        self.shared_up = SharedUpProjection(hooks.shard(values["shared_up"], m_dim), hooks) if shared_up else None
        if self.shared_up is not None:
            tag(self.shared_up.weight, expert=False, tp_dim=m_dim)
        for param, dim in ((self.experts.down, down_dim), (self.experts.up, up_dim),
                           (getattr(self.experts, "subspace", None), n_dim)):
            if param is not None:
                tag(param, expert=config.is_moe, tp_dim=dim).malora_ep_sharded = split
        self.dora = self._build_dora(base_layer, hooks) if config.dora else None
        for part, param in self.adapter_tensors():
            if part in config.frozen_parts:
                param.requires_grad_(False)
        self.fused_weights = WeightCache() if fused and self.kernel == "dense" else None
        self.fused_route = WeightCache(prepare_route_weights) if fused and self.kernel == "sparse" else None
        # the exchange this layer shares with the layers that read the same input (siblings.py)
        self.siblings = None
        base_weight = getattr(base_layer, "weight", None)
        if base_weight is not None and base_weight.device.type != "meta":
            self.to(base_weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        if self.fused_weights is not None:
            out = fused_layer_forward(self, flat_x)  # this rank's output columns under a column base
            return out.view(*x.shape[:-1], out.shape[-1])
        if self.dora is not None:
            out = self._dora_forward(flat_x)
            return out.view(*x.shape[:-1], out.shape[-1])
        if self.siblings is not None:  # one exchange with the layers that read the same x
            out = self.siblings.forward(self, x, flat_x)
            return out.view(*x.shape[:-1], out.shape[-1])
        z, routing, out = self.route(flat_x)           # S_A·drop(x); top-k experts and their scaled gates
        sent = self.dispatcher.send(z, routing)        # rows leave for their experts' ranks
        if out is None:
            out = self.base_layer(flat_x)              # the frozen product, while the rows travel
        target = self.update_target(out)
        result = self.experts(self.dispatcher.receive(sent), target)
        combined = self.dispatcher.combine(result, sent, target)  # back to their tokens, gated
        out = self.apply_update(combined, out, added=True)
        return out.view(*x.shape[:-1], out.shape[-1])

    # ---- the steps a shared exchange (siblings.py) runs for each of its members ----------------
    def route(self, flat_x: torch.Tensor):
        """``(z, routing, out)``: the experts' input (S_A·drop(x), or drop(x)), the top-k routing, and
        the base's output where the fused routing Function computed it with them (else None)."""
        if self.fused_route is not None:
            return fused_route(self, flat_x)
        logits, z = self.shared(flat_x, getattr(self.router, "weight", None))
        return z, self.router(logits), None

    @property
    def update_width(self) -> int:
        """Width of the experts' combined result: this rank's output columns, or d before S_B."""
        return self.experts.up.shape[1]

    def update_target(self, out: torch.Tensor) -> torch.Tensor:
        """Where the experts' results are summed: into ``out`` itself, or into one d-vector per
        token before S_B."""
        return out if self.shared_up is None else out.new_zeros(out.shape[0], self.config.d)

    def apply_update(self, update: torch.Tensor, out: torch.Tensor, added: bool = False) -> torch.Tensor:
        """The layer's output from the base's ``out`` and the experts' combined ``update``
        (``added``: ``update`` is ``out`` with the results summed in already)."""
        if self.shared_up is not None:
            return self.shared_up(update, out)
        return update if added else add_into(out, update)

    # ---- DoRA (method lora with adapter.dora): the magnitude rescales base and update together ----
    @staticmethod
    def _build_dora(base_layer: nn.Module, hooks: TensorParallelHooks) -> DoraMagnitude:
        dora = DoraMagnitude(base_layer, hooks)
        tag(dora.weight, expert=False, tp_dim=0 if hooks.mode == "column" else None)  # one entry per output row
        return dora

    def _dora_forward(self, flat_x: torch.Tensor) -> torch.Tensor:
        _, z = self.shared(flat_x, None)
        out = self.base_layer(flat_x)
        update = self.experts(DenseBatch(z, None), torch.zeros_like(out))
        scale = self.dora.scale(self.base_layer.weight, self.experts.down[0], self.experts.up[0], self.scaling)
        bias = getattr(self.base_layer, "bias", None)
        dropout = self.shared.dropout
        on_dropped = None
        if dropout.training and dropout.p > 0:  # PEFT's second base product, on drop(x)
            on_dropped = self.base_layer(z) if bias is None else self.base_layer(z) - bias
        return self.dora.combine(out, on_dropped, update, scale, bias)

    # ---- the layout-free view of the parameters (adapter files, checkpoints, tests) ----------
    def adapter_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """(file-key suffix, parameter) pairs; experts are stacked by local index."""
        names = [("expert_down", self.experts.down), ("expert_up", self.experts.up)]
        if hasattr(self.experts, "subspace"):
            names.append(("expert_subspace", self.experts.subspace))
        if self.shared.weight is not None:
            names.append(("shared_A", self.shared.weight))
        if self.shared_up is not None:
            names.append(("shared_B", self.shared_up.weight))
        if isinstance(self.router, TopKRouter):
            names.append(("router.weight", self.router.weight))
        if self.dora is not None:
            names.append(("magnitude", self.dora.weight))
        return names

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def shared_A(self) -> Optional[nn.Parameter]:
        return self.shared.weight

    @property
    def expert_down(self) -> nn.Parameter:
        return self.experts.down

    @property
    def expert_up(self) -> nn.Parameter:
        return self.experts.up

    @property
    def num_local_experts(self) -> int:
        return self.experts.down.shape[0]

    @property
    def fused(self) -> bool:
        """A fused Function runs this layer (the whole layer, or its routing and experts)."""
        return self.fused_weights is not None or self.fused_route is not None

    @property
    def router_stats(self):
        return self.router.stats

    @property
    def traffic(self):
        return self.dispatcher.traffic

    def extra_repr(self) -> str:
        c = self.config
        shape = (f"d={c.d}, r̄={c.r_bar}, subspace={c.subspace}, shared_side={c.shared_side}" if c.has_subspace
                 else f"r={c.rank}")
        shape += ", dora" if c.dora else ""
        shape += f", frozen={sorted(c.frozen_parts)}" if c.frozen_parts else ""
        return (f"method={c.method}, {shape}, experts={self.num_experts} (local {self.num_local_experts}), "
                f"top_k={self.top_k}, kernel={self.kernel}{', fused' if self.fused else ''}, "
                f"scaling={self.scaling:g}")


def _initial_values(config: AdapterConfig, n: int, m: int, local: range, seed: int, name: str,
                    on_meta: bool) -> dict:
    """Full-width (before tensor-parallel slicing) initial tensors of this rank's experts."""
    rank = config.adapter_rank
    per_expert = config.has_subspace and config.subspace == "per_expert"
    shared_up = config.has_shared_up  # Ā_t (r̄, n), P_t (d, r̄), S_B (m, d)
    width = config.d if config.has_subspace and not shared_up else n  # what the experts' down contracts
    up_rows = config.d if shared_up else m
    shapes = {"down": (len(local), rank, width), "up": (len(local), up_rows, rank), "router": (config.num_experts, n),
              "shared": (config.d, n) if config.has_shared_projection else None,
              "subspace": (len(local), config.d, n) if per_expert else None,
              "shared_up": (m, config.d) if shared_up else None}
    if on_meta:  # a skeleton (export, parameter counts): shapes only
        return {k: torch.empty(s, device="meta") if s else None for k, s in shapes.items()}
    # identical_init: every expert draws as expert 0 does
    draws = [0] * len(local) if config.identical_init else list(local)
    shared, subspace = None, None
    router = router_init(config.num_experts, n, seed, name) if config.is_moe else None
    if shared_up:  # MALoRA transposed (see init.py): Ā_t = 0, S_B P_t Kaiming-like
        args = (config.d, config.r_bar, m, config.beta, seed, name)
        up = torch.stack([malora_up_coefficients_init(t, *args) for t in local])
        return {"down": torch.zeros(shapes["down"]), "up": up, "router": router, "shared": None, "subspace": None,
                "shared_up": malora_shared_up_init(config.d, m, config.beta, seed, name)}
    if config.method == "malora":
        args = (config.d, config.r_bar, n, config.beta, seed, name)
        down = torch.stack([malora_coefficients_init(t, *args) for t in draws])
        if config.has_shared_projection:
            shared = malora_shared_init(config.d, n, config.beta, seed, name)
        else:  # per-expert subspaces: S_t = β V_t, each P_t paired with its own V_t
            subspace = torch.stack([malora_expert_subspace_init(t, config.d, n, config.beta, seed, name) for t in draws])
    elif config.method == "hydralora":
        down = identity_coefficients(len(local), config.rank)
        shared = lora_down_init(0, config.rank, n, seed, name)  # the one shared A, as LoRA's A
    else:
        down = torch.stack([lora_down_init(t, config.rank, n, seed, name) for t in draws])
    return {"down": down, "up": torch.zeros(shapes["up"]), "router": router, "shared": shared, "subspace": subspace,
            "shared_up": None}
