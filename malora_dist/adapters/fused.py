"""The fused adapted linear: base product, router, adapter and their backward in one autograd Function.

The reference path (``layer.py``'s parts) runs ~50 ATen ops per MoE layer's forward and backward, each
a kernel launch on a GPU, and autograd adds a gradient sum into x per branch that reads x. Here one
``torch.autograd.Function`` per layer does the same math (docs/ARCHITECTURE.md §1 (math)) with a
hand-written backward:

- the router and the first adapter product (MALoRA's ``S_A``, MoLoRA's stacked ``A_t``) are ONE
  product of x with the stacked ``[W_g; S_A]`` (fp32 logits: bf16 inputs with an fp32 output on CUDA
  via ``out_dtype``; fp32/fp64 on CPU stay as they are);
- top-k, the dense gate matrix and the softmax's backward run on the small (T, N) tensors;
- the up-projection is accumulated into the base's fresh output (``addmm_``), and the input
  gradient is formed once (``addmm_`` of the base's product into the adapter's), no autograd sum;
- the backward keeps x (the base's product needs it anyway), the frozen base weight, tensors of
  width N, d or N·r and, with dropout, its bool mask — no T×m or extra T×n activation;
- the stacked/transposed/cast weights are built once per optimizer step (``PreparedWeights``,
  keyed on the parameters' ``_version``), not on every forward.

It covers what ``fused_unsupported_reason`` accepts: the standard lora/molora/malora configurations on
a plain ``nn.Linear`` base or a column- or row-parallel base at any tp, with every expert on this
rank (the dense experts kernel), dropout on or off, z-loss on or off. Under tensor parallelism the
mappings sit inside the Function (docs/ARCHITECTURE.md §4 (tensor parallel)):

- column base (x replicated, W and the up-projection split on m): no collective forward; backward,
  the gradient of the gated rank-space tensor (partial: it comes through the split up-projection)
  and the base's input gradient are summed over tp in **one** all-reduce — the adapter's own input
  gradient, formed from the summed tensor, is the same on every rank and is added after it;
- row base (x, W, and the products that contract n split on n): the router logits with the
  adapter's first product, and the base's output, are partial sums, all-reduced in **one**
  collective forward (the reference parts run two); backward needs none.

Where the experts take rows instead (the grouped kernel: experts split over ranks and reached by
all-to-all, ``expert_kernel: sparse``, a capacity limit) the layer runs the same treatment in two
Functions around the exchange, ``fused_route.py`` (base product, router, S_A) and
``fused_experts.py`` (the grouped experts); this predicate admits both. Renormalised gates, the
gathered/split-input tp styles and any config key it does not know keep the reference parts.

A hand-written backward rather than ``torch.compile`` (not measured against it): it folds
the input gradient into the base's product and keeps only small tensors, which a compiled region
that stops at the frozen base would not, and it needs no compiler on the CPU; the reference forward
also has graph breaks (``_is_view``, the sparse path's host-side counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from malora_dist.adapters.layout import AdapterLayout
from malora_dist.config.adapter import AdapterConfig

KERNELS = ("auto", "fused", "reference")
# The config keys the fused Function implements (each, at any value it accepts). A key added to
# AdapterConfig later (a new method or ablation flag) sends the layer to the reference path as soon
# as it is set away from its default, until the Function learns it.
_FUSED_KEYS = {"method", "rank", "num_experts", "top_k", "lam", "shared_dim", "expert_rank", "alpha", "beta",
               "dropout", "target_modules", "balance_loss_coef", "router_z_loss_coef", "normalize_gates",
               "capacity_factor", "expert_kernel", "kernel", "identical_init"}  # identical_init: initial values only


def fused_unsupported_reason(config: AdapterConfig, layout: AdapterLayout, base_layer: nn.Module,
                             tensor_parallel: bool, experts_kernel: str) -> Optional[str]:
    """None when the fused Function computes exactly this layer; else why it cannot (the predicate
    that picks fused vs reference when the layer is built)."""
    if config.method not in ("lora", "molora", "malora"):
        return f"method {config.method!r} has no fused kernel"
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(config)}
    for key in defaults:
        if key not in _FUSED_KEYS and getattr(config, key) != defaults[key]:
            return f"adapter.{key} is not implemented by the fused kernel"
    if config.normalize_gates:
        return "adapter.normalize_gates is not implemented by the fused kernel"
    if tensor_parallel and getattr(base_layer, "parallel_mode", None) not in ("column", "row"):
        return (f"a tensor-parallel {type(base_layer).__name__} base: the fused kernel implements the column and "
                f"row mappings only")
    if not plain_product(base_layer):
        return (f"the base is a {type(base_layer).__name__} (the fused kernel computes x Wᵀ + b itself: an "
                f"nn.Linear or a column/row-parallel base, without hooks)")
    return None


def plain_product(base_layer: nn.Module) -> bool:
    """The base computes ``x Wᵀ + b`` and nothing else: an ``nn.Linear``, or a column/row-parallel
    wrapper (``malora_dist.models.tp_linear``: this rank's slice of that product, whose tp mappings
    the Function applies itself)."""
    if base_layer._forward_hooks or base_layer._forward_pre_hooks:
        return False
    if type(base_layer) is nn.Linear:
        return True
    return getattr(base_layer, "parallel_mode", None) in ("column", "row")


def use_fused(config: AdapterConfig, layout: AdapterLayout, base_layer: nn.Module, tensor_parallel: bool,
              experts_kernel: str, name: str = "") -> bool:
    """``adapter.kernel``: ``reference`` never, ``fused`` always (an error where it cannot), ``auto``
    wherever it can."""
    if config.kernel == "reference":
        return False
    reason = fused_unsupported_reason(config, layout, base_layer, tensor_parallel, experts_kernel)
    if reason is not None and config.kernel == "fused":
        raise ValueError(f"adapter.kernel=fused cannot run {name or 'this layer'}: {reason}; "
                         f"set adapter.kernel: auto (fused where it can) or reference")
    return reason is None


# ---- products with router precision ---------------------------------------------------------------
_mm_out_dtype_works = True


def wide_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result at least (fp64 stays fp64): bf16/fp16 inputs go to the tensor
    cores with an fp32 output on CUDA; elsewhere they are upcast."""
    if a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64):
        return a @ b
    global _mm_out_dtype_works
    if a.is_cuda and a.dim() == 2 and b.dim() == 2 and _mm_out_dtype_works:
        low = a.dtype if a.dtype not in (torch.float32, torch.float64) else b.dtype
        try:
            return torch.mm(a.to(low), b.to(low), out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError):  # a build without that kernel: upcast from now on
            _mm_out_dtype_works = False
    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    return a.to(wide) @ b.to(wide)


# ---- the weights as the Function reads them --------------------------------------------------------
@dataclass
class PreparedWeights:
    """The adapter's weights in the activations' dtype and the layouts the products read.

    first: (N + w, n), ``[W_g; S_A]`` (MALoRA) or ``[W_g; A_1; …; A_N]`` (MoLoRA), or the down
        projection alone (LoRA: (r, n));
    router_rows: N (0 for LoRA): ``first[:N]`` is the router, ``first[N:]`` what reads drop(x);
    down: (N·r̄, d), MALoRA's stacked P_t (None otherwise);
    up: (N·r, m), the stacked B_t / B̄_t, transposed so that ``out += h @ up``.
    """

    first: torch.Tensor
    router_rows: int
    down: Optional[torch.Tensor]
    up: torch.Tensor


def prepare_weights(router: Optional[torch.Tensor], shared: Optional[torch.Tensor], down: torch.Tensor,
                    up: torch.Tensor, dtype: torch.dtype) -> PreparedWeights:
    with torch.no_grad():
        num, rank, width = down.shape
        flat_down = down.reshape(num * rank, width)
        second = shared if shared is not None else flat_down
        first = second if router is None else torch.cat([router, second])
        up_rows = torch.empty((num, rank, up.shape[1]), dtype=dtype, device=up.device).copy_(up.transpose(1, 2))
        return PreparedWeights(first=first.to(dtype).contiguous(), router_rows=0 if router is None else router.shape[0],
                               down=None if shared is None else flat_down.to(dtype),
                               up=up_rows.view(num * rank, -1))


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# The fused AdamW kernel (train/optim.py) updates parameters in place without moving their
# ``_version`` (checked: torch 2.13, CPU), so every torch optimizer's step also invalidates the cache.
register_optimizer_step_post_hook(_count_optimizer_step)


class WeightCache:
    """The weights as a kernel reads them (``build(*params, dtype)``: ``PreparedWeights`` by default),
    rebuilt only when a parameter may have changed: after any torch optimizer's step, or when its
    ``_version`` moved (``load_state_dict``, a ``no_grad`` fill, a plain in-place update), or when the
    dtype did."""

    def __init__(self, build=None):
        self._build = build or prepare_weights
        self._key = None
        self._weights = None

    def get(self, params: tuple, dtype: torch.dtype) -> PreparedWeights:
        # inference mode makes inference tensors, which a later training forward must not reuse
        key = (dtype, _optimizer_steps, torch.is_inference_mode_enabled()) + tuple(
            (p.data_ptr(), p._version) if p is not None else None for p in params)
        if key != self._key:
            self._weights = self._build(*params, dtype)
            self._key = key
        return self._weights


# ---- the Function -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedSpec:
    """What the Function computes, besides its tensors.

    keep: the dropout's keep mask (T, n) bool, scaled by ``keep_scale``, or None (no dropout). The
        Function keeps it for the backward (1 byte per element, where the reference parts keep
        drop(x) itself). Recomputing the layout-free hash in the backward instead made the fused
        MALoRA layer 3 % slower than the reference parts (one CPU layer, 1024², 512 tokens).
    """

    num_experts: int
    top_k: int
    scaling: float
    z_loss: bool
    keep: Optional[torch.Tensor] = None
    keep_scale: float = 1.0
    tp_mode: Optional[str] = None  # None, "column" or "row" (the base's tensor-parallel mapping)
    tp_group: Optional[object] = None


def _sum_over_tp(parts: list, group) -> list:
    """(T, ·) tensors summed over tp, in one collective where their dtypes agree (then as contiguous
    copies); each its own where they do not (a bf16 base beside the fp32 router)."""
    if len({p.dtype for p in parts}) > 1:
        parts = [p.contiguous() for p in parts]
        for p in parts:
            dist.all_reduce(p, group=group)
        return parts
    flat = torch.cat(parts, dim=1)
    dist.all_reduce(flat, group=group)
    return [chunk.contiguous() for chunk in flat.split([p.shape[1] for p in parts], dim=1)]


def logits_gradient(grad_probs: torch.Tensor, probs: torch.Tensor, lse: Optional[torch.Tensor],
                    grad_z_sum: Optional[torch.Tensor]) -> torch.Tensor:
    """The router logits' gradient from the probabilities' (through the softmax) and, with a z-loss
    (``lse``: each token's logsumexp), from Σ logsumexp²'s."""
    grad_logits = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    if lse is not None and grad_z_sum is not None and grad_z_sum.numel():
        grad_logits = grad_logits + (2 * grad_z_sum) * lse.unsqueeze(-1) * probs
    return grad_logits


class FusedAdapterFunction(torch.autograd.Function):
    """Outputs: the layer's output (T, m), the router's probability sums (N,), Σ logsumexp² (a scalar)
    and the routed slots per expert (N,) int64 (not differentiable); LoRA's and a disabled z-loss's
    outputs are empty."""

    @staticmethod
    def forward(ctx, spec: FusedSpec, weights: PreparedWeights, x, base_weight, base_bias, router, shared, down, up):
        routed = weights.router_rows > 0
        keep = spec.keep
        dropped = x if keep is None else x * keep.to(x.dtype) * spec.keep_scale
        num_router = weights.router_rows
        if routed and keep is None:  # one product for router and adapter: they read the same x
            both = wide_product(x, weights.first.t())
            logits, rest = both[:, :num_router], both[:, num_router:]
        else:
            logits = wide_product(x, weights.first[:num_router].t()) if routed else None
            rest = dropped @ weights.first[num_router:].t()
        if spec.tp_mode == "row":  # partial sums over the ranks' slices of n: router, adapter and base
            partial = [t for t in (logits, rest, x @ base_weight.t()) if t is not None]
            *reduced, out = _sum_over_tp(partial, spec.tp_group)
            logits, rest = reduced if routed else (None, *reduced)
            if base_bias is not None:
                out.add_(base_bias)
        else:
            out = x @ base_weight.t() if base_bias is None else torch.addmm(base_bias, x, base_weight.t())
        rest = rest.to(x.dtype)
        z = rest if weights.down is not None else None
        h = rest if z is None else z @ weights.down.t()
        tokens = x.shape[0]
        if routed:
            probs = torch.softmax(logits, dim=-1)
            experts = torch.topk(probs, spec.top_k, dim=-1).indices
            # scaling on the chosen experts, zero elsewhere: gates = probs · chosen, and the gates'
            # gradient reaches probs through the same (T, N) matrix
            chosen = torch.zeros_like(probs).scatter_(1, experts, spec.scaling)
            gates = probs * chosen
            gated = (h.view(tokens, spec.num_experts, -1) * gates.unsqueeze(-1).to(h.dtype)).view(tokens, -1)
            prob_sums = probs.sum(0)
            lse = torch.logsumexp(logits, dim=-1) if spec.z_loss else None
            z_sum = lse.pow(2).sum() if spec.z_loss else probs.new_empty((0,))
        else:  # LoRA: no router; empty placeholders keep the outputs' arity
            probs = gates = chosen = lse = None
            gated = h * spec.scaling
            prob_sums, z_sum = x.new_empty((0,)), x.new_empty((0,))
            experts = x.new_empty((0,), dtype=torch.int64)
        out.addmm_(gated, weights.up)
        ctx.save_for_backward(x, base_weight, h, gated, z, probs, gates, chosen, lse, keep)
        ctx.spec, ctx.weights, ctx.routed = spec, weights, routed
        ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (router, shared, down, up))
        ctx.set_materialize_grads(False)  # unused outputs (the statistics at eval) cost no zero fills
        # slots per expert, for the balance loss: one op on the (T, N) matrix the gates use anyway
        counts = torch.count_nonzero(chosen, dim=0) if routed else experts
        ctx.mark_non_differentiable(counts)
        return out, prob_sums, z_sum, counts

    @staticmethod
    def backward(ctx, grad_out, grad_prob_sums, grad_z_sum, _grad_counts):
        x, base_weight, h, gated, z, probs, gates, chosen, lse, keep = ctx.saved_tensors
        spec, weights = ctx.spec, ctx.weights
        needs = ctx.needs_input_grad  # spec, weights, x, base_weight, base_bias, router, shared, down, up
        grad_out = torch.zeros_like(x[:, :1]).expand(-1, base_weight.shape[0]) if grad_out is None else grad_out
        grad_out = grad_out.contiguous()
        tokens = x.shape[0]
        grad_up = wide_product(gated.t(), grad_out) if needs[8] else None  # (N·r, m)
        grad_gated = grad_out @ weights.up.t()  # (T, N·r)
        grad_x_base = None
        if spec.tp_mode == "column":  # both partial over the split m: one all-reduce
            grad_x_base = grad_out @ base_weight if needs[2] else None
            if grad_x_base is None:
                (grad_gated,) = _sum_over_tp([grad_gated], spec.tp_group)
            else:
                grad_gated, grad_x_base = _sum_over_tp([grad_gated, grad_x_base], spec.tp_group)
        if ctx.routed:
            num, rank = spec.num_experts, grad_gated.shape[1] // spec.num_experts
            # per (token, expert): the dot product of its rank-space gradient and h (one batched product)
            grad_gates = torch.matmul(grad_gated.view(tokens, num, 1, rank).to(probs.dtype),
                                      h.unflatten(1, (num, rank)).unsqueeze(-1).to(probs.dtype)).view(tokens, num)
            grad_h = (grad_gated.view(tokens, num, rank) * gates.unsqueeze(-1).to(grad_gated.dtype)).view(tokens, -1)
            if grad_prob_sums is not None and grad_prob_sums.numel():  # the balance loss reads every prob
                grad_probs = torch.addcmul(grad_prob_sums.to(probs.dtype), grad_gates, chosen)
            else:
                grad_probs = grad_gates * chosen
            grad_logits = logits_gradient(grad_probs, probs, lse if spec.z_loss else None, grad_z_sum)
        else:
            grad_h = grad_gated * spec.scaling
            grad_logits = None
        grad_down_flat = None
        if z is not None:  # MALoRA: h = z P, z = S_A drop(x)
            grad_down_flat = wide_product(grad_h.t(), z) if needs[7] else None
            grad_rest = grad_h @ weights.down
        else:
            grad_rest = grad_h
        num_router = weights.router_rows
        grad_router = grad_second = grad_x = None
        if keep is None:
            grad_first_rows = (grad_rest if grad_logits is None
                               else torch.cat([grad_logits.to(grad_rest.dtype), grad_rest], 1))
            grad_first = wide_product(grad_first_rows.t(), x)  # (N + w, n): router and second at once
            if num_router:
                grad_router, grad_second = grad_first[:num_router], grad_first[num_router:]
            else:
                grad_second = grad_first
            if needs[2]:
                grad_x = grad_first_rows @ weights.first
        else:
            scaled_keep = keep.to(x.dtype) * spec.keep_scale
            grad_second = wide_product(grad_rest.t(), x * scaled_keep)
            if needs[2]:
                grad_x = (grad_rest @ weights.first[num_router:]).mul_(scaled_keep)
                if num_router:
                    grad_x.addmm_(grad_logits.to(x.dtype), weights.first[:num_router])
            if num_router:
                grad_router = wide_product(grad_logits.t(), x)
        if grad_x is not None:  # the base's input gradient, accumulated once
            grad_x = grad_x.add_(grad_x_base) if grad_x_base is not None else grad_x.addmm_(grad_out, base_weight)
        num, rank = spec.num_experts, grad_gated.shape[1] // spec.num_experts
        if z is None:
            grad_down = grad_second.view(num, rank, -1)
            grad_shared = None
        else:
            grad_down = grad_down_flat.view(num, rank, -1) if grad_down_flat is not None else None
            grad_shared = grad_second
        grad_up = grad_up.view(num, rank, -1).transpose(1, 2) if grad_up is not None else None
        grads = [g if g is None or g.dtype == dtype else g.to(dtype)
                 for g, dtype in zip((grad_router, grad_shared, grad_down, grad_up), ctx.param_dtypes)]
        return (None, None, grad_x, None, None, *grads)


def fused_adapter(x: torch.Tensor, base_weight: torch.Tensor, base_bias: Optional[torch.Tensor],
                  router: Optional[torch.Tensor], shared: Optional[torch.Tensor], down: torch.Tensor,
                  up: torch.Tensor, spec: FusedSpec, weights: Optional[PreparedWeights] = None):
    """(out, prob_sums, z_sum, slot counts) of one adapted linear; ``weights`` from a ``WeightCache``
    (made here when None: what ``gradcheck`` needs, as it perturbs the parameters in place)."""
    if weights is None:
        weights = prepare_weights(router, shared, down, up, x.dtype)
    return FusedAdapterFunction.apply(spec, weights, x, base_weight, base_bias, router, shared, down, up)


class FusedLayer:
    """The whole-layer Function as a part of an adapted linear (dense experts, all on this rank): it
    owns the weights as the Function reads them, rebuilt once per optimizer step, and reports the
    routing statistics it computed to the layer's router. The layer's other parts stay the
    parameters' owners; this part reads them at each call."""

    def __init__(self):
        self.weights = WeightCache()

    def __call__(self, layer, flat_x: torch.Tensor) -> torch.Tensor:
        """``AdapterLinear.forward`` on the fused path: (T, n) → (T, m) (this rank's output columns
        under a column base)."""
        router = getattr(layer.router, "weight", None)
        shared, down, up = layer.shared.weight, layer.experts.down, layer.experts.up
        weights = self.weights.get((router, shared, down, up), flat_x.dtype)
        dropout, hooks = layer.shared.dropout, layer.shared.hooks
        keep = dropout.mask_for(flat_x, hooks.input_features(flat_x.shape[-1]))
        spec = FusedSpec(num_experts=layer.num_local_experts, top_k=layer.top_k, scaling=layer.scaling,
                         z_loss=router is not None and layer.router.z_loss, keep=keep,
                         keep_scale=1.0 / (1.0 - dropout.p) if keep is not None else 1.0,
                         tp_mode=hooks.mode, tp_group=hooks.group)
        base = layer.base_layer
        out, prob_sums, z_sum, counts = fused_adapter(flat_x, base.weight, base.bias, router, shared, down, up,
                                                      spec, weights)
        if router is not None:
            layer.router.record(counts, flat_x.shape[0], prob_sums, z_sum)
        return out
