"""Copy this rank's slice of every Hugging Face checkpoint tensor into a tensor-parallel model.

Two sources with one interface (``keys()``, ``read(key, dim, rank, tp)``): a loaded HF model's state
dict, and a local safetensors directory read tensor by tensor with ``safe_open(...).get_slice``, so
that a large model is never materialised whole on a rank. The tensor-parallel model mirrors the HF
module names (``model.layers.3.self_attn.q_proj``), so the checkpoint key of a tensor is its module
path; how it is split comes from the module type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from safetensors import safe_open
from torch import nn

from malora_dist.models.tp_linear import TensorParallelBase


def _shard_index(shape, dim: int, rank: int, tp: int) -> tuple[slice, ...]:
    size = shape[dim] // tp
    return (slice(None),) * dim + (slice(rank * size, (rank + 1) * size),)


class StateDictSource:
    """Tensors of an in-memory state dict (e.g. a loaded HF model, GGUF-dequantised included)."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor]):
        self._tensors = state_dict

    def keys(self):
        return self._tensors.keys()

    def read(self, key: str, dim: int | None, rank: int, tp: int) -> torch.Tensor:
        tensor = self._tensors[key]
        return tensor if dim is None else tensor[_shard_index(tensor.shape, dim, rank, tp)]


class SafetensorsSource:
    """Tensors of a local ``save_pretrained`` directory (one file or an index of shards)."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {key: os.path.join(directory, name) for key, name in weight_map.items()}
        elif os.path.isfile(single):
            with safe_open(single, framework="pt") as f:
                self._files = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {directory!r}: "
                "save the model there with save_pretrained(...) or load it with load_hf_model"
            )

    def keys(self):
        return self._files.keys()

    def read(self, key: str, dim: int | None, rank: int, tp: int) -> torch.Tensor:
        with safe_open(self._files[key], framework="pt") as f:
            if dim is None:
                return f.get_tensor(key)
            tensor_slice = f.get_slice(key)
            return tensor_slice[_shard_index(tensor_slice.get_shape(), dim, rank, tp)]


def weight_plan(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """(checkpoint key, parameter, split dim or None) for every parameter of a tensor-parallel model."""
    if isinstance(module, TensorParallelBase):
        for name, dim in module.shard_dims.items():
            if getattr(module, name) is not None:
                yield prefix + name, getattr(module, name), dim
        return
    if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
        # vocab-parallel embedding and LM head: rows are vocabulary entries (a tied head has none)
        if module.weight is not None:
            yield prefix + "weight", module.weight, 0
        return
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, param, None
    for name, child in module.named_children():
        yield from weight_plan(child, f"{prefix}{name}.")


@torch.no_grad()
def load_shards(model: nn.Module, source, rank: int, tp: int) -> None:
    """Copy (never alias) this rank's slice of each checkpoint tensor into the model."""
    filled = set()
    for key, param, dim in weight_plan(model):
        if key not in source.keys():
            raise KeyError(f"the checkpoint has no tensor {key!r}, which the sharded model needs")
        shard = source.read(key, dim, rank, tp)
        if shard.shape != param.shape:
            raise ValueError(
                f"{key}: this rank's checkpoint slice has shape {tuple(shard.shape)}, "
                f"the sharded model expects {tuple(param.shape)}"
            )
        param.copy_(shard)
        filled.add(id(param))
    missing = [name for name, param in model.named_parameters() if id(param) not in filled]
    if missing:
        raise RuntimeError(f"no checkpoint tensor was mapped to {missing}")
