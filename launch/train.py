#!/usr/bin/env python
"""Train an adapter (``malora-train`` once the package is installed): see ``malora_dist/commands/train.py``.

``torchrun [--nnodes N --nproc_per_node P ...] launch/train.py --config CFG [--set k=v ...]``, under
SLURM's ``srun``, or ``python launch/train.py --config CFG`` for one process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malora_dist.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
