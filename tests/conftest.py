import os
import sys

import pytest

# One thread per process: the multi-process tests share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

# A skip fails the run unless a GPU was missing (tests/skip_policy.py).
pytest_plugins = ["skip_policy"]


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory):
    """The directory holding ``training_support.TRAINED_RUNS``, trained once per session in one
    2-process world (spawning is the slow part on 2 cores)."""
    from training_support import train_runs
    from world import run_world

    root = str(tmp_path_factory.mktemp("trained_runs"))
    run_world(2, train_runs, root)
    return root
