"""``<output_dir>/config.yaml`` and ``run_info.json``: the run's config, versions, commit and layout."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

import torch.distributed as dist
import yaml

from malora_dist.config.run import RunConfig
from malora_dist.runtime.groups import ParallelGroups


def _git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "megatron-core", "transformers", "datasets", "peft", "malora_dist"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_run_info(config: RunConfig, output_dir: str, groups: ParallelGroups) -> None:
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
    info = {"versions": _versions(), "git_commit": _git_commit(), "world_size": dist.get_world_size(),
            "layout": {"tp": groups.tp, "dp": groups.dp, "ep": groups.ep, "edp": groups.edp},
            "backend": dist.get_backend()}
    with open(os.path.join(output_dir, "run_info.json"), "w") as f:
        json.dump(info, f, indent=2)
