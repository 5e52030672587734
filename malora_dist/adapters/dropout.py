"""Dropout whose mask does not depend on the layout (docs/ARCHITECTURE.md §7.3 (dropout)).

The mask on feature j of a token is a hash of (seed, step, layer, the token's place in the step's
global batch, j): ranks of a tensor-parallel group that hold the same tokens draw the same mask (so
the replicated S_A, P_t, A_t and routers get the same gradients and stay identical), a row-parallel
shard takes its slice of the full mask, and a run gives the same losses at every layout and resumes
exactly without RNG state. The trainer says where each micro-batch's tokens sit
(``set_dropout_context``); without a context (a user's own loop) the mask comes from torch's RNG, as
``nn.Dropout``'s does.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows.
_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply) on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = (h * _MULTIPLIERS[0]) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MULTIPLIERS[1]) & _MASK32
    return h ^ (h >> 16)


def _key(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


@dataclass(frozen=True)
class DropoutContext:
    """Where the current micro-batch's tokens sit: ``token_place`` holds, for each token of the
    model's input (any shape, flattened in the input's order), its place in the step's global
    batch (global sequence index × sequence length + position)."""

    seed: int
    step: int
    token_place: torch.Tensor


def keep_mask(context: DropoutContext, layer_key: int, features: range, p: float, device) -> torch.Tensor:
    """(tokens, len(features)) booleans: which inputs survive, a pure function of its arguments."""
    places = context.token_place.reshape(-1).to(device=device, dtype=torch.int64)
    base = _key(context.seed, context.step, layer_key)
    per_token = _mix32((places & _MASK32) ^ base)
    per_feature = (torch.arange(features.start, features.stop, device=device, dtype=torch.int64) * _GOLDEN) & _MASK32
    bits = _mix32((per_token[:, None] + per_feature[None, :]) & _MASK32)
    return bits >= int(p * (1 << 32))


class LayoutFreeDropout(nn.Module):
    """Inverted dropout on the adapter's input; ``context`` is set by ``set_dropout_context``."""

    def __init__(self, p: float, layer_name: str):
        super().__init__()
        self.p = p
        self.layer_key = _key(layer_name)
        self.context: Optional[DropoutContext] = None

    def forward(self, x: torch.Tensor, features: Optional[range] = None) -> torch.Tensor:
        """``x`` (tokens, width); ``features``: the global feature indices of x's columns (a
        row-parallel shard's slice), default all of them."""
        if not self.training or self.p == 0:
            return x
        if self.context is None:
            return F.dropout(x, self.p, training=True)
        features = features or range(x.shape[-1])
        if self.context.token_place.numel() != x.shape[0]:
            raise ValueError(f"the dropout context places {self.context.token_place.numel()} tokens, but the "
                             f"adapter's input holds {x.shape[0]}: set it for each micro-batch")
        mask = keep_mask(self.context, self.layer_key, features, self.p, x.device)
        return x * mask.to(x.dtype) * (1.0 / (1.0 - self.p))

    def mask_for(self, x: torch.Tensor, features: Optional[range] = None) -> Optional[torch.Tensor]:
        """The keep mask (tokens, width) bool that ``forward`` would apply, or None when inactive —
        for a fused kernel that applies the dropout itself. ``features`` as for ``forward``."""
        if not self.training or self.p == 0:
            return None
        if self.context is None:
            # nn.Dropout's own draw (same RNG stream as the reference path's F.dropout of x)
            return F.dropout(torch.ones_like(x), self.p, training=True) != 0
        if self.context.token_place.numel() != x.shape[0]:
            raise ValueError(f"the dropout context places {self.context.token_place.numel()} tokens, but the "
                             f"adapter's input holds {x.shape[0]}: set it for each micro-batch")
        return keep_mask(self.context, self.layer_key, features or range(x.shape[-1]), self.p, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def set_dropout_context(model: nn.Module, context: Optional[DropoutContext]) -> None:
    """Tell every adapter dropout of ``model`` where the next forward's tokens sit (None: torch's RNG)."""
    for module in model.modules():
        if isinstance(module, LayoutFreeDropout):
            module.context = context


def token_places(first_row: int, rows: int, seq_len: int) -> torch.Tensor:
    """(rows, seq_len) places of a micro-batch whose first sequence is the step's ``first_row``-th."""
    return (torch.arange(first_row, first_row + rows)[:, None] * seq_len + torch.arange(seq_len)[None, :])
