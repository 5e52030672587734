"""Frozen tensor-parallel linears: thin wrappers around megatron-core's column/row parallel layers.

The wrappers are the contract with the adapters: an adapter replaces e.g. ``q_proj`` by a module
that keeps the wrapper as ``base_layer`` and reads ``parallel_mode``, the full ``in_features`` /
``out_features``, ``tp_size``, ``tp_rank``, ``tp_group`` and the local ``weight`` shard from it.
``forward(x)`` returns one plain tensor (megatron's ``(output, bias)`` pair is resolved here):

- "column": input replicated over tp, output sharded on ``out_features``;
- "row": input sharded on ``in_features``, output all-reduced (full), bias added once after it;
- None (the plan styles ``colwise_gather_output`` / ``rowwise_split_input``): full input, full
  output, the weight still split; to an adapter this is a plain replicated linear. These styles
  exist where the full output is needed (OLMo2's q/k norms over all heads, Phi-3's fused
  ``qkv_proj`` / ``gate_up_proj``, whose contiguous split would cut across the fused parts).

Only megatron code paths that run without CUDA are used: CPU initialisation with initialisation
switched off (weights are copied in afterwards, never drawn), ``gather_output=False``, no sequence
parallelism, no RNG tracker. So no CUDA shim is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from malora_dist.runtime.groups import ParallelGroups


def megatron_config(tp: int, dtype: torch.dtype) -> ModelParallelConfig:
    """The megatron config of a frozen base: CPU allocation, no init (weights are copied in)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=dtype,
    )


def never_initialise(weight: torch.Tensor) -> None:
    """megatron's ``init_method``: base weights come from the checkpoint, so drawing them is a bug."""
    raise RuntimeError("frozen base weights are copied from the checkpoint, never initialised")


def resolve_tp_group(groups: ParallelGroups) -> dist.ProcessGroup:
    """The tensor-parallel group, as a real group object also when tp == 1.

    megatron's ``vocab_parallel_cross_entropy`` takes no group argument and always uses the global
    tp group of ``parallel_state``; ``ParallelGroups.build`` initialises that, and this check makes
    sure the explicit group and the global one are the same ranks.
    """
    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        raise ValueError(
            "the tensor-parallel model needs process groups, also in one process: call "
            "malora_dist.runtime.distributed.init_distributed() and then ParallelGroups.build(tp=...) first"
        )
    global_group = ps.get_tensor_model_parallel_group()
    group = groups.tp_group if groups.tp_group is not None else global_group
    if group.size() != groups.tp or dist.get_process_group_ranks(
        group
    ) != dist.get_process_group_ranks(global_group):
        raise ValueError(
            f"groups.tp={groups.tp} does not match megatron's tensor-parallel group "
            f"(ranks {dist.get_process_group_ranks(global_group)}), which its vocab-parallel "
            "cross-entropy uses: build the groups with ParallelGroups.build(tp=...)"
        )
    return group


class _GatherOrSplitLastDim(torch.autograd.Function):
    """All-gather the last dim over tp (``gather``), or keep this rank's slice of it; backward does
    the other. The gathered tensor's consumers are replicated over tp, so every rank holds the
    full gradient and its slice is exact; the slices' gradients gather back to the full one."""

    @staticmethod
    def forward(ctx, x, group, gather: bool):
        ctx.group, ctx.gather = group, gather
        return _gather_or_split(x, group, gather)

    @staticmethod
    def backward(ctx, grad):
        return _gather_or_split(grad, ctx.group, not ctx.gather), None, None


def _gather_or_split(x: torch.Tensor, group, gather: bool) -> torch.Tensor:
    return all_gather_last_dim(x, group) if gather else local_slice_last_dim(x, group)


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every tp rank's ``x`` on the last dim (no autograd)."""
    if group.size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(group.size())]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def local_slice_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(group.size(), dim=-1)[group.rank()].contiguous()


class TensorParallelBase(nn.Module):
    """What column and row wrappers share: the attributes adapters read, and a plain-tensor forward."""

    parallel_mode: str | None
    # how each checkpoint tensor of this layer is split over tp (None: replicated)
    shard_dims: dict[str, int | None]
    megatron_cls: type
    megatron_options: dict

    def __init__(self, in_features, out_features, *, bias: bool, config: ModelParallelConfig, tp_group):
        super().__init__()
        self.linear = self.megatron_cls(
            in_features,
            out_features,
            config=config,
            init_method=never_initialise,
            bias=bias,
            skip_bias_add=False,  # megatron adds the bias (a row layer: once, after the all-reduce)
            tp_group=tp_group,
            **self.megatron_options,
        )
        self.in_features = in_features
        self.out_features = out_features
        self.tp_group = tp_group
        self.tp_size = tp_group.size()
        self.tp_rank = tp_group.rank()

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.linear(x)  # the returned bias is None: it was added already
        return output

    def extra_repr(self) -> str:
        return (
            f"{self.parallel_mode}, in_features={self.in_features}, "
            f"out_features={self.out_features}, tp={self.tp_rank}/{self.tp_size}"
        )


class ColumnParallelBase(TensorParallelBase):
    """``W x + b`` with W split on its output rows: input replicated, output sharded."""

    parallel_mode = "column"
    shard_dims = {"weight": 0, "bias": 0}
    megatron_cls = ColumnParallelLinear
    megatron_options = {"gather_output": False}


class RowParallelBase(TensorParallelBase):
    """``W x + b`` with W split on its input columns: input sharded, output all-reduced."""

    parallel_mode = "row"
    shard_dims = {"weight": 1, "bias": None}
    megatron_cls = RowParallelLinear
    megatron_options = {"input_is_parallel": True}


class GatheredColumnBase(ColumnParallelBase):
    """``colwise_gather_output``: column-parallel, the output all-gathered (full on every rank)."""

    parallel_mode = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherOrSplitLastDim.apply(super().forward(x), self.tp_group, True)


class SplitInputRowBase(RowParallelBase):
    """``rowwise_split_input``: takes the full input, keeps this rank's slice, row-parallel after."""

    parallel_mode = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_GatherOrSplitLastDim.apply(x, self.tp_group, False))


# base_model_tp_plan style -> the wrapper that implements it on an nn.Linear
LINEAR_STYLES = {
    "colwise": ColumnParallelBase,
    "rowwise": RowParallelBase,
    "colwise_gather_output": GatheredColumnBase,
    "rowwise_split_input": SplitInputRowBase,
}
