"""The step-0 values of a saved adapter, recomputed from its run's seed (what training started from).

An adapter's initial values are a function of (seed, layer name, expert) only (``adapters/init.py``),
whatever the layout that trained it. So each adapted layer of a file is rebuilt here as the
trainer builds it, an ``AdapterLinear`` named as the file names it, over an empty base linear of
the file's shapes, and read back under the same checkpoint keys as ``adapters.io.read_adapter_state``
gives the trained tensors. Nothing of the step-0 state has to be stored.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.nn as nn

from malora_dist.adapters.inject import inject_adapters
from malora_dist.analysis.subspaces import layer_prefixes, layer_sizes
from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.run import load_run_config
from malora_dist.parallel.adapter_files import adapter_state

# DoRA's magnitude starts at the norms of the base weights, which an adapter file does not hold:
# it has no step-0 value here (the analysis does not read it).
BASE_DEPENDENT = ("magnitude_vector",)


def run_config_path(path: str) -> str:
    """``RUN/config.yaml`` of ``RUN/adapter`` or of a checkpoint ``RUN/checkpoints/step_N``."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "checkpoints":
        parent = os.path.dirname(parent)
    return os.path.join(parent, "config.yaml")


def run_seed(path: str) -> int:
    """The ``train.seed`` that initialised the adapter at ``path`` (from its run's config)."""
    config = run_config_path(path)
    if not os.path.exists(config):
        raise ValueError(f"{path!r} has no run config at {config!r} to read its seed from: give the seed "
                         f"that trained it (--seed)")
    return load_run_config(config).train.seed


def _skeleton(shapes: dict) -> nn.Module:
    """A module tree holding one empty linear at each layer name (dots make the nesting)."""
    root = nn.Module()
    for name, (n, m) in shapes.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        # an uninitialised base: the adapter's initial values do not read it (DoRA's magnitude aside)
        parent.add_module(leaf, nn.Linear(n, m, bias=False, device="meta").to_empty(device="cpu"))
    return root


def initial_adapter_state(state: dict, config: AdapterConfig, seed: int) -> dict:
    """The step-0 tensors of an adapter whose trained tensors are ``state`` (checkpoint keys, as
    ``read_adapter_state`` gives them), trained from ``seed``: same keys, same shapes."""
    shapes = {prefix: layer_sizes(state, prefix, config) for prefix in layer_prefixes(state, config.method)}
    if not shapes:
        raise ValueError("the adapter holds no adapted layer to recompute")
    model = inject_adapters(_skeleton(shapes), config, seed=seed, share_exchanges=False)
    initial = adapter_state(model)
    initial = {k: v for k, v in initial.items() if not k.endswith(BASE_DEPENDENT)}
    missing = sorted(set(state) - set(initial) - {k for k in state if k.endswith(BASE_DEPENDENT)})
    if missing:
        raise ValueError(f"the recomputed initial state lacks {missing[:3]}: the adapter's layout of keys is "
                         f"not the one this version builds")
    for key, value in initial.items():
        if key in state and state[key].shape != value.shape:
            raise ValueError(f"{key}: the file holds {tuple(state[key].shape)}, the initialisation gives "
                             f"{tuple(value.shape)}")
    return initial


def seed_for(path: str, seed: Optional[int]) -> int:
    """``seed`` where given, else the run's."""
    return run_seed(path) if seed is None else seed
