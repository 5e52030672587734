import os
import sys

# One thread per process: the multi-process tests share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

torch.set_num_threads(1)

# A skip fails the run unless a GPU was missing (tests/skip_policy.py).
pytest_plugins = ["skip_policy"]
