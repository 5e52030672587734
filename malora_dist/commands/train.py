"""``malora-train`` / ``launch/train.py``: train an adapter from a run config.

    torchrun [--nnodes N --nproc_per_node P ...] launch/train.py --config CFG [--set k=v ...]
    torchrun --nproc_per_node P -m malora_dist.commands.train --config CFG     (the installed package)

Also runs under SLURM's ``srun`` (ranks from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) and as plain
``malora-train --config CFG`` for one process. ``--dry-run --world-size N`` validates the config
against N ranks and exits without starting anything.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from malora_dist.config.run import load_run_config
from malora_dist.runtime.launch_env import resolve_launch_env
from malora_dist.train.preflight import validate_run
from malora_dist.train.run import train_from_config
from malora_dist.train.trainer import STOP_EVENT


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="malora-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (see configs/README.md)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key; the value is parsed as YAML (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config and exit")
    parser.add_argument("--world-size", type=int, help="with --dry-run: the number of ranks to validate for")
    args = parser.parse_args(argv)

    try:
        if args.world_size is not None and not args.dry_run:
            raise ValueError("--world-size goes with --dry-run: a real launch takes its world size from "
                             "torchrun or srun")
        if args.world_size is not None and args.world_size < 1:
            raise ValueError(f"--world-size must be a positive number of ranks, got {args.world_size}")
        if args.dry_run:
            config = load_run_config(args.config, args.set)
            world = args.world_size if args.world_size is not None else resolve_launch_env(os.environ).world_size
            validate_run(config, world)
            print(f"config OK for {world} rank(s): tp={config.parallel.tp}, ep={config.parallel.ep}, "
                  f"dp={world // config.parallel.tp}")
            return 0
        signal.signal(signal.SIGTERM, lambda signum, frame: STOP_EVENT.set())
        train_from_config(args.config, args.set)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
