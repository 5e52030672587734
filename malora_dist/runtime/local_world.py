"""Run a function in a fresh world of local processes and collect what each rank returns.

Tests and benchmarks use it: ``torch.multiprocessing`` spawn, MASTER_ADDR 127.0.0.1, the backend
and device from ``malora_dist.runtime.distributed`` (gloo on CPU, NCCL on GPUs). ``fn`` must be importable by
name (a module-level function) because the ranks are spawned.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from malora_dist.runtime.distributed import free_port, init_distributed, shutdown_distributed


def _worker(rank, world_size, port, threads, out_dir, capture_logs, timeout_s, fn, args):
    if capture_logs:  # a rank's output goes to its log file, shown when a rank fails
        log = open(os.path.join(out_dir, f"rank{rank}.log"), "w")
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)

    try:
        init_distributed(timeout_s=timeout_s)
        result = ("ok", fn(*args))
        shutdown_distributed()
    except BaseException:  # the parent re-raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def _log_tails(out_dir: str, world_size: int, lines: int = 30) -> str:
    tails = []
    for rank in range(world_size):
        path = os.path.join(out_dir, f"rank{rank}.log")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                tails.append(f"--- rank {rank} log (tail) ---\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(tails)


def run_local_world(world_size: int, fn, *args, threads: int = 1, capture_logs: bool = False,
                    timeout_s: float = 300.0) -> list:
    """Call ``fn(*args)`` on every rank of a fresh world; return the per-rank results."""


    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(_worker,
                               args=(world_size, free_port(), threads, out_dir, capture_logs, timeout_s, fn, args),
                               nprocs=world_size, start_method="spawn")
        except Exception as err:
            raise RuntimeError(f"a rank died: {err}\n{_log_tails(out_dir, world_size)}") from None
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}\n{_log_tails(out_dir, world_size)}")
            results.append(value)
        return results
