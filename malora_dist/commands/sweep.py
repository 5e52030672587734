"""Sweeps: a grid over config keys, trained and evaluated point by point, aggregated over seeds.

    python -m malora_dist.commands.sweep run --config BASE.yaml --out sweeps/ranks \\
        --grid adapter.method=molora,malora --grid adapter.rank=4,8 --grid train.seed=0,1,2 \\
        [--set k=v ...] [--eval-limit 200] [--rows-per-batch 64] [--launcher "torchrun --nproc_per_node 2"]
    python -m malora_dist.commands.sweep run --out sweeps/ranks          # resume: skips finished points
    python -m malora_dist.commands.sweep run --out sweeps/ranks --train-only   # the adapters, no evaluation
    python -m malora_dist.commands.sweep table --out sweeps/ranks        # the aggregated table again
    sbatch --array=0-11 launch/slurm/sweep_array.sbatch sweeps/ranks   # one point per array task

``run`` writes ``sweep.json`` (the base config, the grid and the list of points) first; each point
trains into ``points/<name>/run`` with ``checkpoint.resume: auto`` (an interrupted point continues
from its newest checkpoint) and is evaluated on its run's held-out sets into
``points/<name>/eval.json``; a point with an ``eval.json`` is done and never re-run. Training and
evaluation of a point are launched as separate commands (``--launcher`` prefixes them, e.g.
torchrun or srun, for multi-process layouts). ``table`` groups the points by every grid key except
``train.seed``: per task, the mean ± standard deviation of the score (accuracy; ROUGE-L for rouge_l
tasks) over seeds, and the paper's number beside it where the paper reports that method on that task
(its LLaMA-2-7B results, for orientation only). Writes ``results.json``, ``results.md`` and, with
matplotlib, ``results.png``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Optional

from malora_dist.sweep.runner import load_or_create, run_point, write_table


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="malora-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "run-index", "table"))
    parser.add_argument("index", nargs="?", type=int, help="run-index: the point to run (a SLURM array task id)")
    parser.add_argument("--out", required=True, help="the sweep's directory")
    parser.add_argument("--config", help="the base run config (a new sweep)")
    parser.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                        help="a swept key and its values (repeatable; the grid is their product)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a key set for every point (repeatable)")
    parser.add_argument("--launcher", default="", help='prefix of each launch, e.g. "torchrun --nproc_per_node 2"')
    parser.add_argument("--eval-limit", type=int, help="evaluate each point on the first N held-out examples per task")
    parser.add_argument("--rows-per-batch", type=int,
                        help="packed rows per forward pass of each point's evaluation (launch/evaluate.py's)")
    parser.add_argument("--train-only", action="store_true",
                        help="train the points (their adapters) and evaluate none; the table holds the evaluated ones")
    args = parser.parse_args(argv)
    try:
        spec = load_or_create(args)
        if args.command == "run-index":
            if args.index is None or not 0 <= args.index < len(spec["points"]):
                raise ValueError(f"run-index needs a point index in [0, {len(spec['points'])})")
            run_point(spec, spec["points"][args.index], args.out, args.train_only)
            return 0
        if args.command == "run":
            for point in spec["points"]:
                print(f"[sweep] point {point['index'] + 1}/{len(spec['points'])}: {point['name']}", flush=True)
                run_point(spec, point, args.out, args.train_only)
        write_table(spec, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"error: a point failed ({' '.join(err.cmd)} exited {err.returncode}); fix it and run the "
              f"same command again to resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
