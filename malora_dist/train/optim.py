"""AdamW over the adapter parameters (fp32 master weights) and the learning-rate schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    for p in params:
        if p.dtype != torch.float32:
            raise ValueError(f"adapter parameters must be fp32 master weights, found {p.dtype}")
    # fused: one kernel per parameter for the whole update (CPU and CUDA). The MoE adapters have four
    # parameters per adapted linear (720 on SmolLM2): the unfused per-parameter loop of ~10 small ops
    # took 0.093 s per step there, the fused kernel 0.032 s. Every parameter gets the same
    # elementwise arithmetic on every rank and layout, so replicas stay bit-identical.
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=True)


def lr_factor(step: int, total_steps: int, warmup_ratio: float, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up, then decay."""
    warmup = int(round(warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def build_scheduler(optimizer, total_steps: int, warmup_ratio: float, schedule: str, min_ratio: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_ratio, schedule, min_ratio)
    )
