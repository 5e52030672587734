"""``python -m malora_dist.commands.plan`` / ``launch/plan.py``: plan a run at N ranks before it starts.

    python launch/plan.py --config configs/paper_inter_malora.yaml --model-config configs/models/llama2-7b.json \\
        --world-size 64 --set train.global_batch_size=64 [--machine h100|h200|FILE] [--gpu-memory-gib 80] \\
        [--all-layouts]

Builds each distinct rank position of the config's layout on the meta device under a fake process
group and prints its memory; with ``--all-layouts`` every (tp, ep, placement) the world size allows
(tp within a node), ranked by predicted step time among those that fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

from malora_dist.plan.machine import load_machine
from malora_dist.plan.planner import candidate_layouts, plan_layout, plan_layouts
from malora_dist.plan.rank_build import plan_run_config

GIB = 2**30


def _memory_rows(plan, memory_bytes: float, checkpointing: bool) -> list[str]:
    rows = [f"  {'rank':>6} {'ranks':>5} {'frozen':>8} {'trainable':>9} {'grads':>8} {'optim':>8} {'experts':>8} "
            f"{'acts':>8} {'acts(ckpt)':>10} {'total':>8}  (GiB; total {'with' if checkpointing else 'without'} "
            f"checkpointing, of {memory_bytes / GIB:.0f})"]
    for rank, m in plan.memory.items():
        rows.append(f"  {rank:>6} {plan.ranks_per_position[rank]:>5} {m.frozen_bytes / GIB:>8.3f} "
                    f"{m.trainable_bytes / GIB:>9.3f} {m.gradient_bytes / GIB:>8.3f} {m.optimizer_bytes / GIB:>8.3f} "
                    f"{m.expert_bytes / GIB:>8.3f} {m.activation_bytes / GIB:>8.3f} "
                    f"{m.checkpointed_activation_bytes / GIB:>10.3f} {m.total(checkpointing) / GIB:>8.3f}"
                    + ("" if m.total(checkpointing) <= memory_bytes else "  DOES NOT FIT"))
    return rows


def _prediction_row(plan, checkpointing: bool) -> str:
    p = plan.prediction
    share = p.exchange_s / p.step_s
    return (f"{plan.name:<24} {p.step_s:>9.4f} {p.tokens_per_s:>11.0f} {p.forward_s:>8.4f} {p.backward_s:>8.4f} "
            f"{p.exchange_s:>8.4f} {p.all_reduce_s:>8.4f} {p.optimizer_s:>8.4f} {share:>6.1%} "
            f"{plan.peak_bytes(checkpointing) / GIB:>8.2f} "
            f"{plan.placements.get('ep', 0):>4}/{plan.placements.get('replicate', 0):<4}")


PREDICTION_HEADER = (f"{'layout':<24} {'step s':>9} {'tokens/s':>11} {'fwd':>8} {'bwd':>8} {'exch':>8} "
                     f"{'allred':>8} {'optim':>8} {'exch%':>6} {'peak GiB':>8} ep/rep")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="malora-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    parser.add_argument("--model-config", help="an HF config.json standing in for the model (no weights read)")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks")
    parser.add_argument("--machine", default="h100", help="h100, h200 or a YAML/JSON machine file")
    parser.add_argument("--gpu-memory-gib", type=float, help="memory per rank (default: the machine's)")
    parser.add_argument("--all-layouts", action="store_true", help="plan and rank every allowed layout")
    parser.add_argument("--json", help="also write the plan to this JSON file")
    args = parser.parse_args(argv)

    try:
        if args.world_size < 1:
            raise ValueError(f"--world-size must be a positive number of ranks, got {args.world_size}")
        machine = load_machine(args.machine)
        if args.gpu_memory_gib is not None:
            machine = dataclasses.replace(machine, memory_bytes=args.gpu_memory_gib * GIB)
        config = plan_run_config(args.config, args.set, args.model_config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checkpointing = config.train.activation_checkpointing
    print(f"machine: {machine.name} ({machine.source})")
    plan = plan_layout(config, args.world_size, machine)
    print(f"\n{args.config} at {args.world_size} ranks, {plan.name}:")
    if plan.error:
        print(f"error: {plan.error}", file=sys.stderr)
        return 2
    print("\n".join(_memory_rows(plan, machine.memory_bytes, checkpointing)))
    print(f"\n{PREDICTION_HEADER}\n{_prediction_row(plan, checkpointing)}")
    plans = [plan]
    if args.all_layouts:
        plans = plan_layouts(config, args.world_size, machine, max_tp=machine.gpus_per_node,
                             layouts=candidate_layouts(config, args.world_size))
        print(f"\nevery layout, fastest first among those that fit {machine.memory_bytes / GIB:.0f} GiB:")
        print(PREDICTION_HEADER)
        for p in plans:
            print(f"{p.name:<24} error: {p.error}" if p.error else _prediction_row(p, checkpointing))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([plan_to_dict(p, checkpointing) for p in plans], f, indent=1)
    return 0


def plan_to_dict(plan, checkpointing: bool) -> dict:
    out = {"tp": plan.tp, "ep": plan.ep, "placement": plan.placement, "error": plan.error}
    if not plan.error:
        out.update(memory={str(r): dataclasses.asdict(m) for r, m in plan.memory.items()},
                   peak_bytes=plan.peak_bytes(checkpointing), prediction=plan.prediction.to_dict(),
                   placements=plan.placements)
    return out


if __name__ == "__main__":
    sys.exit(main())
