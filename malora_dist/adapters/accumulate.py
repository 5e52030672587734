"""Adding adapter results into the frozen base's fresh output, in place where autograd allows."""

from __future__ import annotations

import torch


def in_place_allowed(out: torch.Tensor) -> bool:
    """Not when ``out`` is a view, as megatron's row-parallel reduction returns (autograd forbids
    modifying that in place). At LoRA ranks an extra pass over the T×m output costs more than the
    adapter itself, so the in-place path matters."""
    return not out._is_view()


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out + a @ b``."""
    return out.addmm_(a, b) if in_place_allowed(out) else torch.addmm(out, a, b)


def add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out`` with ``rows[i]`` added to ``out[index[i]]``."""
    return out.index_add_(0, index, rows) if in_place_allowed(out) else out.index_add(0, index, rows)


def add_into(out: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``out + update``."""
    return out.add_(update) if in_place_allowed(out) else out + update
