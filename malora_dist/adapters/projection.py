"""The projection step: router logits and the adapter's input, from x.

The router sees x itself; the adapter sees drop(x), through MALoRA's shared down-projection
``S_A`` (computed once per token, before routing: the shared part, and what travels — d numbers
instead of n). MoLoRA and LoRA have no shared part: their adapter input is drop(x).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from malora_dist.adapters.dropout import LayoutFreeDropout
from malora_dist.adapters.tensor_parallel import TensorParallelHooks


class _UpcastProduct(torch.autograd.Function):
    """``x.to(w.dtype) @ wᵀ`` that keeps x in its own dtype for the backward.

    The router computes in fp32; with a bf16 base, autograd would keep the fp32 copy of x (T×n×4
    bytes per MoE layer) for the weight gradient. This keeps x itself (already kept by the base's
    product) and makes the copy again in the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x.to(w.dtype) @ w.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad_x = (grad @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x.to(w.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def router_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` in the router's dtype (``w``'s)."""
    return x @ w.t() if x.dtype == w.dtype else _UpcastProduct.apply(x, w)


class SharedProjection(nn.Module):
    """``shared``: S_A (d, n), sharded on n under a row-parallel base, or None."""

    def __init__(self, shared: Optional[torch.Tensor], dropout: LayoutFreeDropout, hooks: TensorParallelHooks):
        super().__init__()
        self.weight = None if shared is None else nn.Parameter(shared)
        self.dropout = dropout
        self.hooks = hooks

    def forward(self, x: torch.Tensor,
                router_weight: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(router logits or None, the adapter's input z)."""
        if self.weight is not None and router_weight is not None and self._fusable(router_weight):
            # One product for the router and S_A (both read x): one skinny input-gradient GEMM and one
            # gradient sum into x instead of two of each (those T×n passes cost more than the
            # products' FLOPs). It runs in the router's fp32; z returns to x's dtype. Row parallel:
            # both are partial sums, one all-reduce.
            both = self.hooks.sum_partial(router_product(x, torch.cat([router_weight, self.weight])))
            logits, z = both.split([router_weight.shape[0], self.weight.shape[0]], dim=-1)
            return logits, z.to(x.dtype)
        logits = None if router_weight is None else self.hooks.sum_partial(router_product(x, router_weight))
        z = self.dropout(x, self.hooks.input_features(x.shape[-1]))
        if self.weight is not None:
            z = self.hooks.sum_partial(z @ self.weight.t().to(z.dtype))
        return logits, z

    def _fusable(self, router_weight: torch.Tensor) -> bool:
        """Only when the adapter's input is x itself (dropout would feed S_A another input than the
        router's) and S_A has the router's dtype."""
        no_dropout = not self.dropout.training or self.dropout.p == 0
        return no_dropout and self.weight.dtype == router_weight.dtype
