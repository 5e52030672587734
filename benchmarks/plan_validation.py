"""The step-time model against measured CPU runs: predicted vs measured per phase.

    OMP_NUM_THREADS=1 python benchmarks/plan_validation.py --world-size 2 --set parallel.ep=2
    OMP_NUM_THREADS=1 python benchmarks/plan_validation.py --world-size 4 --set parallel.ep=2 --set parallel.tp=2

Each rank of a real gloo world measures this machine (``plan.measure.calibrated_machine``) and then
runs the config's steps for real (``plan.measure.measured_run``); the planner, given the measured
machine, predicts the same layout from its meta-device build. Prints one Markdown row per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malora_dist.plan.measure import calibrated_machine, measured_run  # noqa: E402
from malora_dist.runtime.local_world import run_local_world  # noqa: E402

# forward and backward include the exchange (it runs inside them); exchange is the part of the step
# spent in its collectives (measured by the profiler on a step of its own, rank 0)
PHASES = ("forward_s", "backward_s", "exchange_s", "all_reduce_s", "optimizer_s", "step_s")


def calibrate_and_run(config: str, overrides: list, model_config, steps: int):
    return calibrated_machine(), measured_run(config, overrides, model_config, steps)


def compare(config: str, overrides: list, world_size: int, model_config=None, steps: int = 3) -> dict:
    """{"machine", "measured" (rank 0's), "predicted", "memory": (planned, measured) per rank}."""
    from malora_dist.plan.planner import plan_layout
    from malora_dist.plan.rank_build import plan_run_config

    results = run_local_world(world_size, calibrate_and_run, config, overrides, model_config, steps)
    machine = results[0][0]
    plan = plan_layout(plan_run_config(config, overrides, model_config), world_size, machine)
    if plan.error:
        raise ValueError(plan.error)
    predicted = plan.prediction.to_dict()
    # the exchange runs inside forward and backward in a real step; the prediction's, split 3:2 as its
    # collectives are (count exchange and rows out and back forward; the two mirrors backward)
    predicted["forward_s"] += 0.6 * predicted["exchange_s"]
    predicted["backward_s"] += 0.4 * predicted["exchange_s"]
    return {"machine": machine, "measured": results[0][1]["times"], "predicted": predicted,
            "measured_ranks": [r for _, r in results], "planned_memory": plan.memory,
            "ranks_per_position": plan.ranks_per_position}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--model-config")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    out = compare(args.config, args.set, args.world_size, args.model_config, args.steps)
    label = f"{os.path.basename(args.config)} {' '.join(args.set)} ×{args.world_size} (load {os.getloadavg()[0]:.1f})"
    for phase in PHASES:
        p, m = out["predicted"][phase], out["measured"][phase]
        print(f"| {label} | {phase[:-2]} | {p * 1e3:.1f} | {m * 1e3:.1f} | {(p - m) / m:+.0%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"label": label, "predicted": out["predicted"], "measured": out["measured"],
                   "measured_ranks": [r["times"] for r in out["measured_ranks"]],
                       "machine": out["machine"].to_dict()}, f, indent=1)


if __name__ == "__main__":
    main()
