"""The evaluated model: the run's frozen base in its parallel layout, plus an optional saved adapter."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import torch
import torch.nn as nn

from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.run import RunConfig, load_run_config
from malora_dist.parallel.adapter_files import load_adapter, read_adapter_config
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.runtime.groups import ParallelGroups, validate_layout
from malora_dist.runtime.launch_env import LaunchEnv, resolve_launch_env
from malora_dist.runtime.log import get_logger, setup_logging
from malora_dist.train.build import load_base


def validate_eval_layout(config: RunConfig, world_size: int, adapter: Optional[AdapterConfig]) -> None:
    """Check ``parallel:`` against the world and the evaluated adapter before anything is loaded
    (whether tp divides the model's heads is checked when the base is sharded)."""
    par = config.parallel
    moe = adapter is not None and adapter.is_moe
    validate_layout(world_size, par.tp, par.ep, adapter.num_experts if moe else None)
    if par.ep > 1 and not moe:
        what = f"the adapter is {adapter.method}" if adapter is not None else "no --adapter is given"
        raise ValueError(f"parallel.ep={par.ep} needs a mixture-of-experts adapter, but {what}: "
                         f"pass --set parallel.ep=1")


def fit_eval_layout(config: RunConfig, world_size: int, adapter: Optional[AdapterConfig],
                    pinned: frozenset = frozenset()) -> RunConfig:
    """The run config with ``parallel.tp`` / ``parallel.ep`` shrunk to what ``world_size`` processes and
    the evaluated adapter can hold, so that a training config evaluates in any world (the demo trains
    at ep=2 under 2 processes and scores in one); one log line says what changed.

    Keys in ``pinned`` (``"parallel.tp"``, ``"parallel.ep"``: given on the command line) are kept as
    they are, and ``validate_eval_layout`` refuses them if they do not fit.
    """
    par = config.parallel
    tp = par.tp if "parallel.tp" in pinned or world_size % par.tp == 0 else math.gcd(par.tp, world_size)
    dp = world_size // tp if world_size % tp == 0 else 1
    moe = adapter is not None and adapter.is_moe
    ep = par.ep
    if "parallel.ep" not in pinned:
        ep = math.gcd(ep, dp, adapter.num_experts) if moe else 1
    if (tp, ep) == (par.tp, par.ep):
        return config
    get_logger().info("evaluating at parallel.tp=%d, ep=%d instead of the config's tp=%d, ep=%d, which %d "
                      "process(es)%s cannot hold (--set parallel.tp=/ep= to choose)", tp, ep, par.tp, par.ep,
                      world_size, "" if moe else " without a mixture-of-experts adapter")
    return dataclasses.replace(config, parallel=dataclasses.replace(par, tp=tp, ep=ep))


def build_eval_model(config: RunConfig, groups: ParallelGroups, device: torch.device,
                     adapter_dir: Optional[str] = None) -> nn.Module:
    """The base as training builds it (same seed for a random base), with the adapter of
    ``adapter_dir`` injected from its own saved config, sliced to this rank's layout, then loaded
    from its full tensors. In eval mode (no dropout)."""
    model = load_base(config.model, groups, device, config.train.seed)
    if adapter_dir is not None:
        build_adapters(model, read_adapter_config(adapter_dir), groups)
        load_adapter(model, adapter_dir, groups)  # fills the injected, sliced adapters
    return model.eval()


def pinned_keys(overrides: list) -> frozenset:
    """The config keys that ``--set section.key=value`` overrides name."""
    return frozenset(o.partition("=")[0].strip() for o in overrides)


def serving_config(config_path: str, overrides: list,
                   adapter_dir: Optional[str]) -> tuple[RunConfig, LaunchEnv, Optional[AdapterConfig]]:
    """The run config in the layout this launch can hold, the launch, and the adapter's config: what
    evaluation and generation read before they start the process group. Bad input (the config, the
    adapter directory, the launch environment) raises ``ValueError`` before any process group."""
    config = load_run_config(config_path, overrides)
    if adapter_dir is not None and not os.path.isdir(adapter_dir):
        raise ValueError(f"--adapter {adapter_dir!r} is not a directory")
    launch = resolve_launch_env(os.environ)
    setup_logging(launch.rank)
    adapter = read_adapter_config(adapter_dir) if adapter_dir is not None else None
    return fit_eval_layout(config, launch.world_size, adapter, pinned_keys(overrides)), launch, adapter
