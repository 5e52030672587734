#!/usr/bin/env python
"""Answer prompts with a base model or base + adapter (``malora-generate`` once the package is
installed): see ``malora_dist/commands/generate.py`` (``--help``).

``python launch/generate.py --config CFG [--adapter DIR] [--prompts FILE]`` (stdin without
``--prompts``), or under torchrun / srun for tp, ep and dp.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malora_dist.commands.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
