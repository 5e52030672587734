"""Run a function in a real multi-process world on gloo (127.0.0.1) and collect what each rank returns.

Tests start one world per world size and run many cases inside it: spawning is the slow part on
2 cores, so a module-scoped fixture calls ``run_world`` once and the test functions check its results.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from malora_dist.runtime import free_port


def _worker(rank, world_size, port, out_dir, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from malora_dist.runtime import init_distributed, shutdown_distributed

    try:
        init_distributed(timeout_s=300)
        result = ("ok", fn(*args))
        shutdown_distributed()
    except BaseException:  # the parent re-raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_world(world_size: int, fn, *args):
    """Call ``fn(*args)`` on every rank of a fresh gloo world; return the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            start_method="spawn",
        )
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
