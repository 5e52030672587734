#!/usr/bin/env python
"""The main job: MALoRA on the real SmolLM2-135M-Instruct, experts split over 2 processes.

1. score the base model on held-out examples of the demo's tasks (launch/evaluate.py);
2. train MALoRA with ep=2 under ``torchrun --nproc_per_node 2`` (launch/train.py, configs/demo.yaml);
3. score the trained adapter on the same examples and print both.

    python launch/demo.py [--config configs/demo.yaml] [--limit 60] [--set k=v ...]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--limit", type=int, default=60, help="held-out examples per task")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    from malora_dist.config.run import load_run_config

    output_dir = load_run_config(os.path.join(REPO, args.config), args.set).train.output_dir
    output_dir = output_dir if os.path.isabs(output_dir) else os.path.join(REPO, output_dir)
    overrides = [x for s in args.set for x in ("--set", s)]
    # Scoring runs in one process (both cores): the exported adapter holds every expert, and the
    # evaluation shrinks the config's ep=2 to what one process holds.
    evaluate = [sys.executable, "launch/evaluate.py", "--config", args.config, "--limit", str(args.limit)] + overrides
    start = time.time()
    run(evaluate + ["--output", os.path.join(output_dir, "eval_base.json")])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
         "launch/train.py", "--config", args.config] + overrides)
    run(evaluate + ["--adapter", os.path.join(output_dir, "adapter"),
                    "--output", os.path.join(output_dir, "eval_tuned.json")])

    reports = [json.load(open(os.path.join(output_dir, f"eval_{k}.json")))["tasks"] for k in ("base", "tuned")]
    print(f"\n{'task':12s} {'n':>4s} {'base':>7s} {'MALoRA':>7s}")
    correct = [0, 0]
    total = 0
    for name in reports[0]:
        n = reports[0][name]["n"]
        accuracies = [r[name]["accuracy"] for r in reports]
        print(f"{name:12s} {n:4d} {accuracies[0]:7.3f} {accuracies[1]:7.3f}")
        correct = [c + a * n for c, a in zip(correct, accuracies)]
        total += n
    before, after = (c / total for c in correct)
    # Two-proportion z statistic over all examples: how many standard errors the gain is.
    pooled = (correct[0] + correct[1]) / (2 * total)
    z = (after - before) / math.sqrt(max(2 * pooled * (1 - pooled) / total, 1e-12))
    print(f"{'all':12s} {total:4d} {before:7.3f} {after:7.3f}   gain {after - before:+.3f} (z = {z:.1f})")
    print(f"wall time {time.time() - start:.0f} s; outputs in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
