"""Apply an HF config's ``base_model_tp_plan`` to the model's own modules, with megatron-core layers.

The plan maps module paths under the base model (``layers.*.self_attn.q_proj``) to a style. The
linear styles (``colwise``, ``rowwise``, ``colwise_gather_output``, ``rowwise_split_input``) become
the wrappers of ``tp_linear``; HF's attention infers its head count from the projection's output
(``view(*shape, -1, head_dim)``) and its ``num_key_value_groups`` is a ratio that a split of heads
and KV heads by the same tp keeps, so attention runs on this rank's heads unchanged.
``replicated_with_grad_allreduce`` (Qwen3's and Gemma3's per-head q/k norms) keeps the module
replicated and sums its parameters' gradients over tp (each rank sees only its heads): nothing
to do while the base is frozen, correct if someone unfreezes them. Any other style (e.g.
``packed_colwise`` experts) is refused at tp > 1, naming the style and the module.
"""

from __future__ import annotations

import math
import re

import torch.distributed as dist
from torch import nn

from malora_dist.models.tp_linear import LINEAR_STYLES

REPLICATED_STYLES = ("replicated_with_grad_allreduce",)


def tp_plan(config) -> dict[str, str]:
    return dict(getattr(config, "base_model_tp_plan", None) or {})


def check_plan(config, tp: int) -> None:
    """Refuse, before any module is built, a tp > 1 that the config's plan cannot honour."""
    if tp == 1:
        return
    plan = tp_plan(config)
    if not plan:
        raise ValueError(
            f"the {config.model_type} config has no base_model_tp_plan, so which of its linears are "
            f"column- or row-parallel is unknown: run it with parallel.tp: 1 (tp={tp} was asked)"
        )
    unsupported = {path: style for path, style in plan.items() if style not in (*LINEAR_STYLES, *REPLICATED_STYLES)}
    if unsupported:
        raise ValueError(
            f"the {config.model_type} tensor-parallel plan uses styles this base does not implement: "
            + ", ".join(f"{style!r} on {path}" for path, style in unsupported.items())
            + f"; supported: {sorted(LINEAR_STYLES) + list(REPLICATED_STYLES)}. Run it with parallel.tp: 1"
        )


def check_tp_divisibility(config, tp: int) -> None:
    """Raise a ValueError naming the sizes tp fails to divide and the tp values that work."""
    names = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
    sizes = {name: getattr(config, name) for name in names if getattr(config, name, None)}
    bad = [f"{name}={size}" for name, size in sizes.items() if size % tp]
    if bad:
        common = math.gcd(*sizes.values())
        working = [d for d in range(1, common + 1) if common % d == 0]
        raise ValueError(
            f"tensor parallelism tp={tp} does not divide {', '.join(bad)} of this "
            f"{config.model_type} model: choose tp from {working}"
        )


def plan_styles(base_model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """{module path under the base model: style} for every module the plan names."""
    found = {}
    for name, _ in base_model.named_modules():
        style = plan.get(re.sub(r"\d+", "*", name))
        if style is not None:
            found[name] = style
    return found


def apply_plan(base_model: nn.Module, plan: dict[str, str], mp_config, tp_group) -> None:
    """Replace every linear the plan marks by its megatron-core wrapper (weights are loaded after).

    At tp = 1 modules of other styles are left as they are (nothing to split); at tp > 1
    ``check_plan`` has refused them already.
    """
    for name, style in plan_styles(base_model, plan).items():
        module = base_model.get_submodule(name)
        wrapper = LINEAR_STYLES.get(style)
        if wrapper is None:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"the tensor-parallel plan marks {name} as {style!r}, but it is a "
                f"{type(module).__name__}, not an nn.Linear: this base cannot split it"
            )
        parent_name, _, leaf = name.rpartition(".")
        replacement = wrapper(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            config=mp_config,
            tp_group=tp_group,
        )
        setattr(base_model.get_submodule(parent_name), leaf, replacement)


def reduce_replicated_gradients(base_model: nn.Module, plan: dict[str, str], tp_group) -> None:
    """Sum over tp the gradients of the modules marked ``replicated_with_grad_allreduce`` (hooks on
    the final parameters: call it after the model's storage is settled)."""
    if tp_group.size() == 1:
        return
    for name, style in plan_styles(base_model, plan).items():
        if style in REPLICATED_STYLES:
            for param in base_model.get_submodule(name).parameters():
                param.register_hook(_sum_over(tp_group))


def _sum_over(group):
    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook
