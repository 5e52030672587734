"""One adapter layer family around a frozen linear: LoRA, MoLoRA, MALoRA and their variants
(docs/ARCHITECTURE.md §1 (math), §2 (layer parts)).

``y = base(x) + scaling · Σ_{t ∈ topk} g_t · up_t(down_t(shared(drop(x))))``, built from parts with
one job each. Which parts, their shapes, tensor-parallel splits and initial values are the
variant's (``variant.py``, derived from the config once); the layout (experts split over ranks, the
experts kernel, the fused Functions) picks how they run:

- ``shared`` (``SharedProjection``): router logits and the adapter's input (MALoRA's S_A x);
- ``router`` (``TopKRouter``; LoRA's ``SingleExpert``): top-k experts, gates, routing statistics;
- ``dispatcher``: local dense, local grouped rows, or all-to-all over the EP group;
- ``experts`` (``DenseExperts`` | ``GroupedExperts``, or their per-expert-subspace forms): this
  rank's experts only;
- ``shared_up`` (``SharedUpProjection``, ``adapter.shared_side: up`` only): MALoRA's shared
  subspace mirrored to the up side, applied once per token to the experts' combined d-vectors;
- ``fused_layer`` / ``fused_route`` (``FusedLayer`` | ``FusedRoute``, where ``adapter.kernel``
  picks them): the fused Functions, which own their weight caches and report the routing
  statistics to ``router``.

DoRA (``adapter.dora``) is ``dora.DoraLinear``, this layer with its magnitude part and its own
forward; ``layer_class.adapter_linear`` builds the class of a config's variant.

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
from malora_dist.adapters.dispatch import AllToAllDispatch, DenseDispatch, GroupedDispatch
from malora_dist.adapters.dropout import LayoutFreeDropout
from malora_dist.adapters.experts import DenseExperts, GroupedExperts
from malora_dist.adapters.fused import FusedLayer, use_fused
from malora_dist.adapters.fused_experts import FusedGroupedExperts
from malora_dist.adapters.fused_route import FusedRoute
from malora_dist.adapters.initial_values import initial_values
from malora_dist.adapters.layout import SINGLE_PROCESS, AdapterLayout
from malora_dist.adapters.projection import SharedProjection
from malora_dist.adapters.router import SingleExpert, TopKRouter
from malora_dist.adapters.shared_up import SharedUpProjection
from malora_dist.adapters.subspace_experts import DenseSubspaceExperts, GroupedSubspaceExperts
from malora_dist.adapters.tags import tag
from malora_dist.adapters.tensor_parallel import TensorParallelHooks
from malora_dist.adapters.variant import PLAIN, SHARED_UP, AdapterVariant
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
    """The adapted linear of the plain forward (and of ``shared_side: up``'s, whose S_B part applies
    after the experts); DoRA's forward is ``dora.DoraLinear``'s. ``layer_class.adapter_linear`` builds
    the class of a config's variant."""

    FORWARDS = (PLAIN, SHARED_UP)  # the forward kinds (variant.py) this class runs

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
        self.variant = AdapterVariant.of(config, self.in_features, self.out_features)
        if self.variant.forward not in self.FORWARDS:  # a DoRA config would lose its magnitude here
            raise ValueError(f"{type(self).__name__} does not run the {self.variant.forward} forward of "
                             f"{name or 'this layer'}: build it with layer_class.adapter_linear (inject_adapters "
                             f"does)")
        hooks = TensorParallelHooks(getattr(base_layer, "parallel_mode", None), getattr(base_layer, "tp_group", None))
        self.num_experts, self.top_k = self.variant.num_experts, self.variant.top_k
        self.scaling = config.scaling
        local = layout.local_experts(self.num_experts)
        self.expert_offset = local.start
        self.expert_load: Optional[torch.Tensor] = None  # slots per expert in the last micro-batch (auxiliary_loss)
        self.kernel = expert_kernel(config, layout.experts_split)
        # the fused Functions where they implement this layer (adapter.kernel): one for the whole layer
        # with dense experts, two around the rows' exchange with grouped ones (FusedRoute,
        # FusedGroupedExperts); the parts stay the parameters' owners and the reference path
        fused = use_fused(config, layout, base_layer, hooks.mode is not None, self.kernel, name)
        base_weight = getattr(base_layer, "weight", None)
        on_meta = base_weight is not None and base_weight.device.type == "meta"  # a skeleton: shapes only
        values = initial_values(self.variant, config, local, seed, name, on_meta)
        self._build_parts({k: hooks.shard(v, self.variant.part(k).tp_dim(hooks.mode)) for k, v in values.items()},
                          hooks, layout, fused)
        for part, (_, param) in zip(self.variant.parts, self.adapter_tensors()):
            tag(param, expert=part.per_expert and self.variant.routed, tp_dim=part.tp_dim(hooks.mode))
            if part.per_expert:
                param.malora_ep_sharded = layout.experts_split
            if part.frozen:
                param.requires_grad_(False)
        self.fused_layer = FusedLayer() if fused and self.kernel == "dense" else None
        self.fused_route = FusedRoute() if fused and self.kernel == "sparse" else None
        # the exchange this layer shares with the layers that read the same input (siblings.py)
        self.siblings = None
        if base_weight is not None and not on_meta:
            self.to(base_weight.device)

    def _build_parts(self, values: dict, hooks: TensorParallelHooks, layout: AdapterLayout, fused: bool) -> None:
        """The modules that hold the variant's parts, from this rank's ``values`` of them."""
        variant, config = self.variant, self.config
        self.shared = SharedProjection(values.get("shared_A"), LayoutFreeDropout(config.dropout, self.name), hooks)
        # An up-projection replicated over tp (shared_side: up's P_t, S_B after it): the gates and the
        # experts enter no sharded matrix, the one tp copy is S_B's
        routed_hooks = hooks if variant.part("expert_up").split == "m" else hooks.for_replicated_up()
        if variant.routed:
            self.router = TopKRouter(values["router.weight"], config.top_k, config.normalize_gates,
                                     config.router_z_loss_coef > 0, config.scaling, routed_hooks, layout.slice_group)
        else:
            self.router = SingleExpert()
        down, up = values["expert_down"], values["expert_up"]
        if variant.has("expert_subspace"):  # each expert reads x through its own S_t
            args = (down, up, values["expert_subspace"], routed_hooks)
            dense, grouped = DenseSubspaceExperts, GroupedSubspaceExperts
        else:
            args = (down, up, variant.contracts_n, routed_hooks)
            dense, grouped = DenseExperts, FusedGroupedExperts if fused else GroupedExperts
        if self.kernel == "dense":
            self.experts = dense(*args, scaling=config.scaling)
            self.dispatcher = DenseDispatch(self.num_experts)
        else:
            self.experts = grouped(*args)
            self.dispatcher = (AllToAllDispatch(self.num_experts, config.capacity_factor, layout.ep_group,
                                                layout.ep_size, layout.ep_rank, source_major=fused)
                               if layout.experts_split else GroupedDispatch(self.num_experts, config.capacity_factor))
        self.shared_up = SharedUpProjection(values["shared_B"], hooks) if variant.has("shared_B") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        if self.fused_layer is not None:
            out = self.fused_layer(self, flat_x)  # this rank's output columns under a column base
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
            return self.fused_route(self, flat_x)
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

    # ---- the layout-free view of the parameters (adapter files, checkpoints, tests) ----------
    def adapter_tensors(self) -> list[tuple[str, nn.Parameter]]:
        """(part name, parameter) pairs of the variant's parts, in its order; experts are stacked by
        local index. Each parameter is found at its part's path, the name the files give it."""
        return [(part.name, self.get_parameter(part.path)) for part in self.variant.parts]

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
        return self.fused_layer is not None or self.fused_route is not None

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

