"""The one place where the backend and device are chosen, and the default process group is started.

Everything else takes a ``torch.device`` and process groups as arguments, so the same code runs on
NCCL+CUDA and on gloo+CPU unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist

from malora_dist.runtime.launch_env import resolve_launch_env


def pick_backend_and_device(local_rank: int = 0) -> tuple[str, torch.device]:
    """NCCL on the local GPU when CUDA is present, else gloo on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


# What a one-process world put into os.environ (key -> the value before, or None), put back at
# shutdown: a later subprocess (a test's, a notebook's next command) must not inherit this world's
# RANK and MASTER_PORT and take itself for a rank of a world that is gone.
_SINGLE_WORLD_ENV: dict = {}


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Start the default process group from the launch environment and return the device.

    torchrun, SLURM's srun and a plain single process are all accepted (``malora_dist.runtime.launch_env``);
    a single process still gets a world of one, so that every code path (collectives included) is
    the same for one CPU and for many GPUs.
    """

    launch = resolve_launch_env(os.environ)
    backend, device = pick_backend_and_device(launch.local_rank)
    if dist.is_initialized():
        return device
    if launch.launcher == "single":
        launch = dataclasses.replace(launch, master_port=free_port())
        _SINGLE_WORLD_ENV.update({key: os.environ.get(key) for key in launch.export()})
    os.environ.update(launch.export())
    timeout = datetime.timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RESTART_COUNT" in os.environ:
        # Under torchrun, connect to its store and namespace by restart attempt: a restarted gloo
        # world would otherwise read the dead attempt's addresses and fail in connectFullMesh.
        store = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size, is_master=False,
                              timeout=timeout)
        store = dist.PrefixStore(f"attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
        dist.init_process_group(backend=backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return device


def shutdown_distributed(barrier: bool = True) -> None:
    """Barrier before destroy: without it gloo processes may abort at exit (docs/ARCHITECTURE.md
    §3.6 (hang rules)). Skip the barrier when leaving on an error: a peer may be gone, and it would
    wait a full timeout."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    for key, value in _SINGLE_WORLD_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SINGLE_WORLD_ENV.clear()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (single-process worlds, tests, benchmarks)."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
