"""The routing step of an adapted linear whose experts take rows, as one autograd Function.

Where the experts are reached by rows (split over ranks and exchanged by all-to-all, or grouped on
one rank: ``expert_kernel: sparse``, a capacity limit), the layer cannot be one Function: the rows
leave for other ranks between the router and the experts. It runs two instead, around the exchange:
this one, which reads x, and ``fused_experts.py``, which reads the rows. Here, from x:

- the frozen base's product ``x Wᵀ + b``, the router's logits and MALoRA's ``S_A drop(x)`` (the
  experts' input, what travels): one product of x with ``[W_g; S_A]`` where dropout is off, and
  under a row-parallel base their partial sums all-reduced in **one** collective;
- softmax, top-k and the gates (times the adapter's scaling), and the router statistics (probability
  sums, Σ logsumexp², slots per expert) from the same (T, N) tensors;
- the backward forms x's gradient once, base and adapter together (the reference parts leave
  autograd two or three sums into x), and under a column-parallel base sums the gates' partial
  gradient (they scale rows of this rank's output columns) with the base's partial input gradient in
  **one** all-reduce. It keeps x, the base weight, the (T, N) probabilities, the (T, k) choices and,
  with dropout, the bool mask.

The router's arithmetic is the reference parts': the logits (and, where dropout is off, S_A x
with them) from the weights in their own dtype (fp32 master weights) with x upcast to it, as
``projection.router_product`` does; with dropout, S_A reads the dropped x in the activations' dtype,
as ``SharedProjection`` does. Rounding W_g and S_A to a bf16 base's dtype instead flipped top-k
choices the reference parts do not (at tp = 2 × ep = 2 on a bf16 base: 0.112 against 0.043
relative error of the logits from fp64).

The base product runs before the rows leave rather than while they travel (the reference parts'
order): the price of one input gradient. MoLoRA's experts read drop(x) itself, which the layer
forms outside (no S_A).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from malora_dist.adapters.fused import WeightCache, _sum_over_tp, logits_gradient, wide_product
from malora_dist.adapters.gating import slot_counts
from malora_dist.adapters.router import Routing


@dataclass(frozen=True)
class RouteSpec:
    """What the Function computes besides its tensors (``keep``: the dropout's bool mask or None)."""

    top_k: int
    scaling: float
    z_loss: bool
    keep: Optional[torch.Tensor] = None
    keep_scale: float = 1.0
    tp_mode: Optional[str] = None  # None, "column" or "row": the base's tensor-parallel mapping
    tp_group: Optional[object] = None


@dataclass
class RouteWeights:
    """``first``: ``[W_g; S_A]`` (N + d, n) or ``W_g`` alone (N, n), in the weights' own dtype;
    ``shared_low``: S_A in the activations' dtype, for the product with the dropped x (or None)."""

    first: torch.Tensor
    router_rows: int
    shared_low: Optional[torch.Tensor] = None


def prepare_route_weights(router: torch.Tensor, shared: Optional[torch.Tensor], dtype: torch.dtype) -> RouteWeights:
    with torch.no_grad():
        first = router if shared is None else torch.cat([router, shared])
        shared_low = None if shared is None else shared.to(dtype).contiguous()
        return RouteWeights(first.contiguous(), router.shape[0], shared_low)


def _in_weight_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with ``a`` upcast to ``b``'s dtype (the weights'), fp32 at least."""
    return wide_product(a.to(b.dtype) if a.dtype != b.dtype else a, b)


class FusedRouteFunction(torch.autograd.Function):
    """Outputs: the base's output (T, m), z = S_A drop(x) (T, d; empty without S_A), the gates (T, k),
    the chosen experts (T, k) int64, the probability sums (N,), Σ logsumexp² (scalar; empty without a
    z-loss) and the slots per expert (N,) int64."""

    @staticmethod
    def forward(ctx, spec: RouteSpec, weights: RouteWeights, x, base_weight, base_bias, router, shared):
        num = weights.router_rows
        keep = spec.keep
        if shared is not None and keep is None:  # router and S_A read the same x: one product
            both = _in_weight_dtype(x, weights.first.t())
            logits, z = both[:, :num], both[:, num:]
        else:
            logits = _in_weight_dtype(x, weights.first[:num].t())
            z = None
            if shared is not None:
                z = (x * keep.to(x.dtype) * spec.keep_scale) @ weights.shared_low.t()
        if spec.tp_mode == "row":  # partial sums over the ranks' slices of n
            partial = [t for t in (logits, z, x @ base_weight.t()) if t is not None]
            reduced = _sum_over_tp(partial, spec.tp_group)
            logits, out = reduced[0], reduced[-1]
            z = reduced[1] if z is not None else None
            if base_bias is not None:
                out.add_(base_bias)
        else:
            out = x @ base_weight.t() if base_bias is None else torch.addmm(base_bias, x, base_weight.t())
        probs = torch.softmax(logits, dim=-1)
        top, experts = torch.topk(probs, spec.top_k, dim=-1)
        gates = top * spec.scaling
        lse = torch.logsumexp(logits, dim=-1) if spec.z_loss else None
        z_sum = lse.pow(2).sum() if spec.z_loss else probs.new_empty((0,))
        counts = slot_counts(experts, num)
        ctx.save_for_backward(x, base_weight, probs, experts, lse, keep)
        ctx.spec, ctx.weights, ctx.has_shared = spec, weights, shared is not None
        ctx.param_dtypes = (router.dtype, None if shared is None else shared.dtype)
        ctx.mark_non_differentiable(experts, counts)
        ctx.set_materialize_grads(False)
        z = z.to(x.dtype) if z is not None else x.new_empty((0,))
        return out, z, gates, experts, probs.sum(0), z_sum, counts

    @staticmethod
    def backward(ctx, grad_out, grad_z, grad_gates, _grad_experts, grad_prob_sums, grad_z_sum, _grad_counts):
        x, base_weight, probs, experts, lse, keep = ctx.saved_tensors
        spec, weights = ctx.spec, ctx.weights
        needs_x = ctx.needs_input_grad[2]
        num = weights.router_rows
        grad_x_base = grad_out @ base_weight if needs_x and grad_out is not None else None
        if grad_gates is None:
            grad_gates = torch.zeros_like(probs[:, :spec.top_k])
        if spec.tp_mode == "column":  # both partial over this rank's output columns: one all-reduce
            parts = [grad_gates.contiguous()] + ([grad_x_base] if grad_x_base is not None else [])
            summed = _sum_over_tp(parts, spec.tp_group)
            grad_gates, grad_x_base = summed[0], (summed[1] if grad_x_base is not None else None)
        grad_probs = torch.zeros_like(probs).scatter_(1, experts, grad_gates.to(probs.dtype) * spec.scaling)
        if grad_prob_sums is not None and grad_prob_sums.numel():  # the balance loss reads every prob
            grad_probs.add_(grad_prob_sums.to(probs.dtype))
        grad_logits = logits_gradient(grad_probs, probs, lse, grad_z_sum)  # lse is None without a z-loss
        has_z = ctx.has_shared and grad_z is not None and grad_z.numel()
        grad_shared = None
        wide = weights.first.dtype  # the router's product ran in the weights' dtype: so does its gradient
        x_wide = x if x.dtype == wide else x.to(wide)
        if has_z and keep is None:  # router and S_A at once, as in the forward
            rows = torch.cat([grad_logits.to(wide), grad_z.to(wide)], 1)
            grad_first = wide_product(rows.t(), x_wide)
            grad_router, grad_shared = grad_first[:num], grad_first[num:]
            grad_x = (rows @ weights.first).to(x.dtype) if needs_x else None
        else:
            grad_router = wide_product(grad_logits.to(wide).t(), x_wide)
            grad_x = (grad_logits.to(wide) @ weights.first[:num]).to(x.dtype) if needs_x else None
            if has_z:
                scaled_keep = keep.to(x.dtype) * spec.keep_scale
                grad_shared = wide_product(grad_z.t(), x * scaled_keep)
                if grad_x is not None:
                    grad_x.add_((grad_z @ weights.shared_low).mul_(scaled_keep))
            elif ctx.has_shared:
                grad_shared = torch.zeros_like(weights.first[num:])
        if grad_x is not None:  # the base's input gradient, accumulated once
            if grad_x_base is not None:
                grad_x.add_(grad_x_base)
        router_dtype, shared_dtype = ctx.param_dtypes
        grad_router = grad_router.to(router_dtype)
        grad_shared = grad_shared.to(shared_dtype) if grad_shared is not None else None
        return None, None, grad_x, None, None, grad_router, grad_shared


class FusedRoute:
    """The routing Function as a part of an adapted linear whose experts take rows: it owns the
    weights as the Function reads them (``[W_g; S_A]``, rebuilt once per optimizer step) and reports
    the routing statistics it computed to the layer's router."""

    def __init__(self):
        self.weights = WeightCache(prepare_route_weights)

    def __call__(self, layer, flat_x: torch.Tensor) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        """``(z, routing, out)`` of ``AdapterLinear.route`` on the fused path, with the base's output
        ``out``."""
        router, shared = layer.router.weight, layer.shared.weight
        weights = self.weights.get((router, shared), flat_x.dtype)
        dropout, hooks = layer.shared.dropout, layer.shared.hooks
        keep = dropout.mask_for(flat_x, hooks.input_features(flat_x.shape[-1])) if shared is not None else None
        spec = RouteSpec(top_k=layer.top_k, scaling=layer.scaling, z_loss=layer.router.z_loss, keep=keep,
                         keep_scale=1.0 / (1.0 - dropout.p) if keep is not None else 1.0,
                         tp_mode=hooks.mode, tp_group=hooks.group)
        base = layer.base_layer
        out, z, gates, experts, prob_sums, z_sum, counts = FusedRouteFunction.apply(
            spec, weights, flat_x, base.weight, base.bias, router, shared)
        if shared is None:  # MoLoRA: the experts read drop(x) itself
            z = dropout(flat_x, hooks.input_features(flat_x.shape[-1]))
        layer.router.record(counts, flat_x.shape[0], prob_sums, z_sum)
        return z, Routing(experts, gates, counts), out
