"""``malora-lm-eval``: lm-evaluation-harness's own command line with the ``malora`` model type registered
(malora_dist.evaluation.lm_eval_model).

    malora-lm-eval --model malora --model_args config=CONFIG,adapter=DIR --tasks arc_easy [lm-eval flags ...]
    torchrun --nproc_per_node 2 -m malora_dist.commands.lm_eval --model malora ...   (data parallel)
"""

from __future__ import annotations

import sys
from typing import Optional

from lm_eval.__main__ import cli_evaluate

import malora_dist.evaluation.lm_eval_model  # noqa: F401  registers the malora model type with lm-eval
from malora_dist.runtime.distributed import shutdown_distributed


def main(argv: Optional[list] = None) -> int:
    """lm-eval's command line with the ``malora`` model type registered."""
    sys.argv = [sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))
    finished = False
    try:
        cli_evaluate()
        finished = True
    finally:
        shutdown_distributed(barrier=finished)  # started by MaloraLM under torchrun
    return 0


if __name__ == "__main__":
    sys.exit(main())
