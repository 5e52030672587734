"""Write the synthetic tasks (``malora_dist.data.synthetic``: capitals, zorbian, larger, parity) as
commonsense JSON files, ``DIR/<task>/{train,test}.json``:

    python -m malora_dist.commands.synthetic_data --out DIR [--seed S] [--train-size N] [--test-size N] [--tasks a,b]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from malora_dist.data.synthetic import DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, TASKS, write_synthetic


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m malora_dist.commands.synthetic_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write <task>/{train,test}.json into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help="records per task")
    parser.add_argument("--test-size", type=int, default=DEFAULT_TEST_SIZE, help="records per task")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    args = parser.parse_args(argv)
    paths = write_synthetic(args.out, args.seed, args.train_size, args.test_size, args.tasks.split(","))
    for task, files in paths.items():
        print(f"{task}: {files['train']} ({args.train_size}), {files['test']} ({args.test_size})")


if __name__ == "__main__":
    sys.exit(main())
