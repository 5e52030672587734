"""DoRA (Liu et al. 2024) as PEFT computes it (``LoraConfig(use_dora=True)``): its magnitude part and
the layer that runs its forward.

``y = W0 x + (s − 1) ⊙ W0 drop(x) + s ⊙ scaling·B A drop(x)``, ``s = magnitude / ‖W0 + scaling·B A‖``,
the norm taken per output feature (over n) and detached from the gradient (DoRA §4.3, as PEFT).
Without active dropout ``W0 drop(x)`` is the base's own output, so ``y = s ⊙ (W0 x + scaling·B A x)``;
with it, PEFT pays a second base product on the dropped input, and so does this layer, so that the
two agree. The magnitude starts at ``‖W0‖`` (B = 0), which makes the layer the base at step zero.

Tensor parallelism: a column-parallel base holds whole output rows, so the magnitude and the norm
are sharded with them; a row-parallel base holds a slice of every row, so the squared row sums are
all-reduced over tp (no autograd: the norm is detached) and the magnitude is replicated.

``DoraLinear`` is ``AdapterLinear`` (method lora: one expert, no router) with the magnitude part and
this forward in place of the plain one, so the plain layer has no DoRA branch; the magnitude is the
variant's ``magnitude`` part (``dora.weight``, PEFT's ``lora_magnitude_vector`` in files).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from malora_dist.adapters.dispatch import DenseBatch
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.layout import AdapterLayout
from malora_dist.adapters.tensor_parallel import TensorParallelHooks
from malora_dist.adapters.variant import DORA


class DoraMagnitude(nn.Module):
    def __init__(self, base_layer: nn.Module, hooks: TensorParallelHooks):
        super().__init__()
        weight = getattr(base_layer, "weight", None)
        if weight is None or weight.dim() != 2:
            raise ValueError(f"adapter.dora needs a base layer with a 2-D weight, got {type(base_layer).__name__}")
        self.hooks = hooks
        if weight.device.type == "meta":  # a skeleton (parameter counts): shape only
            self.weight = nn.Parameter(torch.empty(weight.shape[0], device="meta"))
        else:
            self.weight = nn.Parameter(self._initial_norms(weight.detach().float()))

    def _initial_norms(self, w: torch.Tensor) -> torch.Tensor:
        """``‖W0‖`` per output feature, bit for bit what one process computes: a row-parallel base's
        slices are gathered once into whole rows (a sum of per-rank partial sums rounds differently)."""
        if self.hooks.mode == "row":
            parts = [torch.empty_like(w) for _ in range(self.hooks.size)]
            dist.all_gather(parts, w.contiguous(), group=self.hooks.group)
            w = torch.cat(parts, dim=1)
        return (w * w).sum(dim=1).sqrt()

    def _row_norms(self, w: torch.Tensor) -> torch.Tensor:
        squares = (w * w).sum(dim=1)
        if self.hooks.mode == "row":  # each rank holds a slice of every row
            dist.all_reduce(squares, group=self.hooks.group)
        return squares.sqrt()

    def scale(self, base_weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scaling: float) -> torch.Tensor:
        """``magnitude / ‖W0 + scaling·B A‖`` per (local) output feature, the norm detached."""
        with torch.no_grad():
            norm = self._row_norms(base_weight.to(up.dtype) + scaling * (up @ down))
        return self.weight / norm

    def combine(self, base_out: torch.Tensor, base_on_dropped: Optional[torch.Tensor], update: torch.Tensor,
                scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The layer's output from the base's (``base_out``), the base's product on the dropped input
        (None when no dropout is active) and the low-rank ``update`` = scaling·B A drop(x)."""
        scale = scale.to(base_out.dtype)
        if base_on_dropped is None:
            base_on_dropped = base_out if bias is None else base_out - bias
        return base_out + (scale - 1) * base_on_dropped + scale * update

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[0]}"


class DoraLinear(AdapterLinear):
    """Method lora with ``adapter.dora``: the magnitude rescales the base's output and the update
    together. Never fused (the fused Functions do not implement ``dora``) and never exchanged (one
    expert, on every rank)."""

    FORWARDS = (DORA,)

    def _build_parts(self, values: dict, hooks: TensorParallelHooks, layout: AdapterLayout, fused: bool) -> None:
        super()._build_parts(values, hooks, layout, fused)
        self.dora = DoraMagnitude(self.base_layer, hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        _, z = self.shared(flat_x, None)
        out = self.base_layer(flat_x)
        update = self.experts(DenseBatch(z, None), torch.zeros_like(out))
        scale = self.dora.scale(self.base_layer.weight, self.experts.down[0], self.experts.up[0], self.scaling)
        bias = getattr(self.base_layer, "bias", None)
        dropout = self.shared.dropout
        on_dropped = None
        if dropout.training and dropout.p > 0:  # PEFT's second base product, on drop(x)
            on_dropped = self.base_layer(z) if bias is None else self.base_layer(z) - bias
        out = self.dora.combine(out, on_dropped, update, scale, bias)
        return out.view(*x.shape[:-1], out.shape[-1])
