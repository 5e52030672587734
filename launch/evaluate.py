#!/usr/bin/env python
"""Evaluate a base model or base + adapter: see ``malora_dist/commands/evaluate.py`` (``--help``).

``python launch/evaluate.py --config CFG [--adapter DIR] [--task NAME=PATH[:style] ...] [--limit N]
[--output FILE] [--set k=v ...]``, or under torchrun / srun for tp, ep and dp.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malora_dist.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
