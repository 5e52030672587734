"""One adapter layer family around a frozen linear: LoRA, MoLoRA and MALoRA (DESIGN.md §1).

The layer wraps ``base_layer`` (an ``nn.Linear`` or a tensor-parallel base from
``malora_dist.models``) and never changes its weights. Tensor parallelism enters only through two
hooks chosen from the base's ``parallel_mode`` (DESIGN.md §2):

- ``row`` (input sharded on n): every product that contracts n (router logits, ``S_A x``, MoLoRA's
  ``A_t x``) is a partial sum and is all-reduced over tp;
- ``column`` (output sharded on m): the rank-space tensors that enter the sharded up-projection
  (``h = P_t z`` and the gates) pass through ``copy_to_tensor_model_parallel_region`` exactly once,
  which sums their partial gradients; nothing else is reduced over tp.

Expert parallelism enters only through ``self.exchange`` (local, or all-to-all across EP ranks).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import DENSE_KERNEL_MAX_EXPERTS, AdapterConfig
from .exchange import LocalExchange
from .init import kaiming_uniform, malora_svd_init
from .routing import RouterStatistics, plan_slots, router_statistics, top_k_gates
from .tags import tag


def _in_place(out: torch.Tensor) -> bool:
    """Whether the adapter may add into the base's output in place: not when it is a view, as
    megatron's row-parallel reduction returns (autograd forbids modifying that in place)."""
    return not out._is_view()


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out + a @ b``, in place where ``_in_place`` allows."""
    return out.addmm_(a, b) if _in_place(out) else torch.addmm(out, a, b)


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


def _router_product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` in the router's dtype (``w``'s)."""
    return x @ w.t() if x.dtype == w.dtype else _UpcastProduct.apply(x, w)


class AdapterLinear(nn.Module):
    """``y = base(x) + scaling · Σ_{t ∈ topk} g_t · up_t(down_t(shared(drop(x))))``.

    Parameters (full shapes; experts stacked on dim 0 by global index):

    - ``shared_A`` (d, n): MALoRA's shared down-projection S_A (absent otherwise);
    - ``expert_down``: MALoRA's P_t (N, r̄, d), MoLoRA's A_t (N, r, n), LoRA's A (1, r, n);
    - ``expert_up``: MALoRA's B̄_t (N, m, r̄), MoLoRA's B_t (N, m, r), LoRA's B (1, m, r);
    - ``router`` (MoE methods): ``nn.Linear(n, N, bias=False)``, fed x before dropout.
    """

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.config = config
        self.name = name
        self.method = config.method
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.parallel_mode: Optional[str] = getattr(base_layer, "parallel_mode", None)
        self.tp_group = getattr(base_layer, "tp_group", None)
        self.dp_group = None  # set by the expert-parallel step; None = this process alone
        self.num_experts = config.num_experts if config.is_moe else 1
        self.top_k = config.top_k if config.is_moe else 1
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.exchange = LocalExchange()
        self.expert_offset = 0  # global index of this rank's first expert
        config.check_fits(self.in_features, name)
        self._init_parameters(config)
        # The last forward's routing sums (turned into losses by ``inject.auxiliary_loss``), and
        # the global slots per expert of the last forward whose losses were formed.
        self.router_stats: Optional[RouterStatistics] = None
        self.expert_load: Optional[torch.Tensor] = None

    # ---- parameters ----------------------------------------------------------------------
    def _init_parameters(self, config: AdapterConfig) -> None:
        n, m, N = self.in_features, self.out_features, self.num_experts
        base_weight = getattr(self.base_layer, "weight", None)
        on_meta = base_weight is not None and base_weight.device.type == "meta"
        # Tags say which dim tensor parallelism splits: n on a row-parallel base, m on a column one.
        n_dim = lambda dim: dim if self.parallel_mode == "row" else None  # noqa: E731
        m_dim = lambda dim: dim if self.parallel_mode == "column" else None  # noqa: E731
        expert = config.is_moe
        if self.method == "malora":
            shapes = ((config.d, n), (N, config.r_bar, config.d))
            shared, down = (
                [torch.empty(s, device="meta") for s in shapes] if on_meta
                else malora_svd_init(N, config.d, config.r_bar, n, config.beta)
            )
            self.shared_A = tag(nn.Parameter(shared), expert=False, tp_dim=n_dim(1))
            self.expert_down = tag(nn.Parameter(down), expert=True, tp_dim=None)
            up_rank = config.r_bar
        else:
            down = (
                torch.empty(N, config.rank, n, device="meta") if on_meta
                else torch.stack([kaiming_uniform(config.rank, n) for _ in range(N)])
            )
            self.shared_A = None
            self.expert_down = tag(nn.Parameter(down), expert=expert, tp_dim=n_dim(2))
            up_rank = config.rank
        up = torch.zeros(N, m, up_rank, device="meta" if on_meta else "cpu")
        self.expert_up = tag(nn.Parameter(up), expert=expert, tp_dim=m_dim(1))
        if config.is_moe:
            self.router = nn.Linear(n, N, bias=False, device="meta" if on_meta else None)
            tag(self.router.weight, expert=False, tp_dim=n_dim(1))
        else:
            self.router = None
        if base_weight is not None and not on_meta:
            # Built on the CPU from the global RNG (the same on every rank), then moved next to the base.
            self.to(base_weight.device)

    @property
    def num_local_experts(self) -> int:
        return self.expert_down.shape[0]

    # ---- tensor-parallel hooks -----------------------------------------------------------
    def _sum_partial_over_tp(self, t: torch.Tensor) -> torch.Tensor:
        if self.parallel_mode != "row":
            return t
        from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

        return reduce_from_tensor_model_parallel_region(t, group=self.tp_group)

    def _copy_into_sharded_up(self, t: torch.Tensor) -> torch.Tensor:
        if self.parallel_mode != "column":
            return t
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        return copy_to_tensor_model_parallel_region(t, group=self.tp_group)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat_x = x.reshape(-1, x.shape[-1])
        # The base sees the flat input, so that its output is usually a fresh tensor of its own
        # (no view) that the adapter adds into in place (``_in_place``): at LoRA ranks, an extra
        # pass over the T×m output (a copy of the base's output) costs more than the adapter. The
        # scaling goes on the smallest tensor: the gates (T×k), or LoRA's rank-space h (T×r); as
        # addmm's alpha it would cost a pass over the m×r gradient in the backward.
        if self.router is None:
            result = self._lora(flat_x, self.base_layer(flat_x))
        else:  # the MoE path runs the base itself, while its rows are in flight
            result = self._moe(flat_x)
        return result.view(*x.shape[:-1], result.shape[-1])

    # Parameters are fp32 master weights; the products run in the activations' dtype (as autocast
    # would: a bf16 base gets bf16 adapter products, whose gradients reach the fp32 parameters
    # through the casts), except the router, which runs in fp32 (DESIGN.md §1).
    def _lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # squeeze, not [0]: selecting from the stacked (1, ·, ·) parameters would zero-fill their
        # whole gradient in the backward before copying into it
        h = self._project_down(self.expert_down.squeeze(0), self.dropout(x))
        return _add_product(out, (self.scaling * h).to(out.dtype), self.expert_up.squeeze(0).t().to(out.dtype))

    def _moe(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        dense = self._use_dense_kernel()
        side = self._side_weight(dense)
        if side is None:
            logits = self._sum_partial_over_tp(_router_product(x, self.router.weight))
        else:
            # One product for the router and the first projection (both read x): one skinny
            # input-gradient GEMM and one gradient sum into x instead of two of each (those T×n
            # passes cost more than the products' FLOPs), and on a GPU fewer kernels. It runs in the
            # router's fp32 (bf16 x is cast once, for the router anyway); the side part returns to
            # x's dtype. Row parallel: both are partial sums, one all-reduce.
            both = self._sum_partial_over_tp(_router_product(x, torch.cat([self.router.weight, side])))
            logits, x_side = both.split([self.num_experts, side.shape[0]], dim=-1)
            x_side = x_side.to(x.dtype)
        probs, gates, experts = top_k_gates(logits, self.top_k, cfg.normalize_gates)
        self.router_stats = router_statistics(probs, logits, experts, cfg.router_z_loss_coef > 0, self.dp_group)
        gates = self.scaling * self._copy_into_sharded_up(gates)

        z = self.dropout(x)
        if self.shared_A is not None:
            # S_A x once per token, before routing: the shared part, and what travels (d numbers).
            z = x_side if side is not None else self._sum_partial_over_tp(z @ self.shared_A.t().to(z.dtype))
        if dense:
            if side is not None and self.shared_A is None:  # MoLoRA: x_side is A_t x for every t
                h = self._copy_into_sharded_up(x_side)
            else:
                h = self._project_down(self.expert_down.reshape(-1, self.expert_down.shape[-1]), z)
            return self._dense_experts(h, gates, experts, self.base_layer(x))
        plan = plan_slots(experts, self.num_experts, cfg.capacity_factor)
        self.exchange.traffic.dropped_slots += plan.dropped
        sent = self.exchange.send(z[plan.token_of_slot], plan.counts)
        out = self.base_layer(x)  # independent of the experts: overlaps the rows' all-to-all
        rows, local_counts, state = self.exchange.receive(sent)
        rows = self.exchange.combine(self._run_experts(rows, local_counts), state)
        slot_gates = gates.reshape(-1)[plan.order].unsqueeze(-1)
        rows = (rows * slot_gates.to(rows.dtype)).to(out.dtype)
        index_add = out.index_add_ if _in_place(out) else out.index_add
        return index_add(0, plan.token_of_slot, rows)

    def _side_weight(self, dense: bool) -> Optional[torch.Tensor]:
        """The weight that can share the router's product with x, or None.

        MALoRA's S_A, or MoLoRA's stacked A_t under the dense kernel (the sparse kernel applies A_t
        to gathered rows). Only when the adapter's input is x itself: dropout would feed the side
        product a different input than the router's.
        """
        if self.training and isinstance(self.dropout, nn.Dropout):
            return None
        if self.shared_A is not None:
            side = self.shared_A
        elif dense:
            side = self.expert_down.reshape(-1, self.expert_down.shape[-1])
        else:
            return None
        return side if side.dtype == self.router.weight.dtype else None

    def _use_dense_kernel(self) -> bool:
        return self.num_local_experts == self.num_experts and self.dense_when_local()

    def dense_when_local(self) -> bool:
        """Whether the dense kernel computes this layer's experts when all of them are on this rank."""
        cfg = self.config
        if cfg.expert_kernel == "auto":
            return cfg.capacity_factor is None and self.num_experts <= DENSE_KERNEL_MAX_EXPERTS
        return cfg.expert_kernel == "dense"

    def _dense_experts(self, h: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, masked by the top-k gates: ``h`` (T, N·r) is every expert's
        down-projection; one masked product and one matmul, no gather/scatter.

        Unrouted (token, expert) pairs get a zero gate, so their gradients are exact zeros and the
        result equals the sparse kernel's.
        """
        tokens, (num, rank, _) = h.shape[0], self.expert_down.shape
        dense_gates = torch.zeros(tokens, num, dtype=h.dtype, device=h.device).scatter(1, experts, gates.to(h.dtype))
        h = (h.view(tokens, num, rank) * dense_gates.unsqueeze(-1)).reshape(tokens, num * rank)
        # (m, N, r) in the output's dtype: the permute and the cast in one copy
        up = torch.empty((self.expert_up.shape[1], num, rank), dtype=out.dtype, device=out.device).copy_(
            self.expert_up.permute(1, 0, 2))
        return _add_product(out, h.to(out.dtype), up.view(-1, num * rank).t())

    def _project_down(self, down: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ downᵀ`` with its tensor-parallel hooks; ``down`` is one expert's (r, w) matrix
        or all experts' stacked as (N·r, w)."""
        h = rows @ down.t().to(rows.dtype)
        if self.shared_A is None:  # A_t contracts n, which a row-parallel base shards
            h = self._sum_partial_over_tp(h)
        return self._copy_into_sharded_up(h)

    def _run_experts(self, rows: torch.Tensor, counts: list) -> torch.Tensor:
        """Rows grouped by local expert → ``up_t(down_t(rows))``: a loop over the few local experts.

        An expert with no rows still runs (a zero-row matmul): its gradient is an exact zero, and
        every rank keeps issuing the same collectives.
        """
        # Unbind once: indexing the stacked parameter per expert would make each expert's backward
        # zero-fill a full-size gradient (quadratic in N); unbind's backward stacks them once.
        downs, ups = self.expert_down.unbind(0), self.expert_up.unbind(0)
        return torch.cat([self._project_down(downs[t], chunk) @ ups[t].t().to(chunk.dtype)
                          for t, chunk in enumerate(rows.split(counts))])

    def extra_repr(self) -> str:
        c = self.config
        shape = f"d={c.d}, r̄={c.r_bar}" if self.method == "malora" else f"r={c.rank}"
        moe = f", experts={self.num_experts} (local {self.num_local_experts}), top_k={self.top_k}" if c.is_moe else ""
        return f"method={self.method}, {shape}{moe}, scaling={self.scaling:g}, tp={self.parallel_mode}"
