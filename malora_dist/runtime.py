"""The one place where the backend and device are chosen, and the default process group is started.

Everything else takes a ``torch.device`` and process groups as arguments, so the same code runs on
NCCL+CUDA and on gloo+CPU unchanged.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def pick_backend_and_device(local_rank: int = 0) -> tuple[str, torch.device]:
    """NCCL on the local GPU when CUDA is present, else gloo on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> torch.device:
    """Start the default process group from the torchrun-style environment and return the device.

    A single process without ``RANK``/``WORLD_SIZE`` still gets a world of one, so that every code
    path (collectives included) is the same for one CPU and for many GPUs.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend, device = pick_backend_and_device(local_rank)
    if dist.is_initialized():
        return device
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def shutdown_distributed() -> None:
    """Barrier before destroy: without it gloo processes may abort at exit (DESIGN.md §2)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
