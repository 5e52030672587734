"""Where this process sits in the job: torchrun's variables, SLURM's, or a single process.

torchrun's ``RANK``/``WORLD_SIZE`` take precedence over SLURM's (under ``sbatch`` + torchrun both
are set); plain ``srun`` ranks come from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` with the
master on the first node of the job's node list. Errors name the variable and the fix, before any
process group is started.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    def export(self) -> dict:
        """The variables ``init_process_group(init_method='env://')`` reads."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact host list: ``gpu[01-03,07],login1`` → gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                start, end = part.split("-")
                hosts += [f"{prefix}{i:0{len(start)}d}" for i in range(int(start), int(end) + 1)]
            else:
                hosts.append(prefix + part)
    return hosts


def resolve_launch_env(env: Mapping[str, str]) -> LaunchEnv:
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"RANK/WORLD_SIZE are set but {missing} are not: start the job with torchrun, "
                             f"or set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
        launch = LaunchEnv(_int(env, "RANK"), _int(env, "WORLD_SIZE"),
                           _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                           env["MASTER_ADDR"], _int(env, "MASTER_PORT"), "torchrun")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist and "MASTER_ADDR" not in env:
            raise ValueError("SLURM_PROCID is set but no SLURM_JOB_NODELIST/SLURM_NODELIST names the master node: "
                             "run under srun, or set MASTER_ADDR")
        master = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        # One port per job, so that two jobs sharing a node do not collide.
        port = (_int(env, "MASTER_PORT") if "MASTER_PORT" in env
                else DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        launch = LaunchEnv(_int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                           _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                           master, port, "slurm")
    else:
        return LaunchEnv(0, 1, 0, "127.0.0.1", 0, "single")
    if not 0 <= launch.rank < launch.world_size:
        raise ValueError(f"rank {launch.rank} is outside the world of {launch.world_size} processes "
                         f"({launch.launcher})")
    return launch
