#!/usr/bin/env python
"""Plan a run at N ranks before it starts: see ``malora_dist/commands/plan.py``."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malora_dist.commands.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
