"""Put adapters into a causal LM: wrap the target linears, freeze everything else."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from malora_dist.adapters.gating import finish_router_losses
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.layer_class import adapter_linear
from malora_dist.adapters.layout import SINGLE_PROCESS, AdapterLayout
from malora_dist.adapters.siblings import group_siblings
from malora_dist.config.adapter import AdapterConfig


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        hasattr(module, "parallel_mode") and hasattr(module, "in_features") and hasattr(module, "out_features")
    )


def inject_adapters(model: nn.Module, config: AdapterConfig, seed: int = 0,
                    layout_for: Optional[Callable[[str, nn.Module], AdapterLayout]] = None,
                    share_exchanges: bool = True) -> nn.Module:
    """Wrap every linear whose name ends in one of ``config.target_modules``; return the model.

    All base parameters are frozen. ``layout_for(name, base_layer)`` gives each layer its layout
    (default: one process holds everything); ``seed`` and the layer's name determine its initial
    values. A target name that matches no linear layer is an error (a typo would otherwise train
    nothing there). ``share_exchanges``: expert-parallel layers that read the same input (q/k/v,
    gate/up) share one exchange (``siblings.py``); False keeps one per layer (the reference).
    """
    for param in model.parameters():
        param.requires_grad_(False)
    targets = set(config.target_modules)
    found = set()
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets and _is_linear_like(module) and not isinstance(module, AdapterLinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            layout = layout_for(name, module) if layout_for is not None else SINGLE_PROCESS
            setattr(parent, leaf, adapter_linear(module, config, name=name, layout=layout, seed=seed))
            found.add(leaf)
    missing = sorted(targets - found)
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear_like(m)})
        raise ValueError(
            f"adapter.target_modules {missing} match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {available}"
        )
    if share_exchanges:
        group_siblings(model)
    return model


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (frozen parts, ``adapter.freeze``, are saved but not trained)."""
    return [p for _, layer in adapter_layers(model) for _, p in layer.adapter_tensors() if p.requires_grad]


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """The router losses of the last forward (one micro-batch): each averaged over the MoE layers,
    times its coefficient. The trainer averages it over the step's micro-batches.

    Local to the rank that holds the micro-batch (a collective only over a layer's ``slice_group``,
    where a layout splits a micro-batch's tokens). It also sets each layer's ``expert_load`` (slots
    per expert in the micro-batch).
    """
    layers = [layer for _, layer in adapter_layers(model) if layer.router_stats is not None]
    if not layers:
        return torch.zeros(())
    losses = finish_router_losses([layer.router_stats for layer in layers])
    for layer, losses_of_layer in zip(layers, losses):
        layer.router.clear()
        layer.expert_load = losses_of_layer.expert_load
    config = layers[0].config
    total = config.balance_loss_coef * torch.stack([one.balance for one in losses]).mean()
    if config.router_z_loss_coef > 0:
        total = total + config.router_z_loss_coef * torch.stack([one.z for one in losses]).mean()
    return total
