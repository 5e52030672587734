"""Scale tables on paper: LLaMA-2 7B/13B/70B with MALoRA, MoLoRA and LoRA (the paper's inter-domain
configs) at 4, 8, 32, 64 and 256 GPUs (8 per node), planned on a described machine.

    OMP_NUM_THREADS=1 python benchmarks/plan_scale.py --machine h100 --json benchmarks/results/plan/scale_h100.json

Each layout (tp ∈ {1, 2, 4, 8}, ep ∈ {1, 2, 4, 8}, placement ep or replicate) is built once for real
on the meta device under a fake process group (rank 0's position; the memory and the counted work
of a rank depend on tp, ep and placement, not on the world size) and priced at every world size it
divides (``plan.step_time.predict_step`` with that world's dp). Weak scaling: one micro-batch of
one 1,024-token sequence per dp rank per step (the paper: global batch 4 on 4 GPUs), activation
checkpointing as the configs set it. The best layout per world is the fastest that fits the
machine's memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from malora_dist.plan.fake_world import fake_rank  # noqa: E402
from malora_dist.plan.machine import load_machine  # noqa: E402
from malora_dist.plan.planner import with_layout  # noqa: E402
from malora_dist.plan.rank_build import build_rank_model, local_experts_model, plan_run_config, rank_memory  # noqa: E402
from malora_dist.plan.step_time import count_micro_batch, predict_step  # noqa: E402
from malora_dist.runtime.groups import ParallelGroups, validate_layout  # noqa: E402

MODELS = {"7B": "configs/models/llama2-7b.json", "13B": "configs/models/llama2-13b.json",
          "70B": "configs/models/llama2-70b.json"}
METHODS = {"MALoRA": "configs/paper_inter_malora.yaml", "MoLoRA": "configs/paper_inter_molora.yaml",
           "LoRA": "configs/paper_inter_lora.yaml"}
WORLDS = (4, 8, 32, 64, 256)
GIB = 2**30


def layouts(is_moe: bool, tps=(1, 2, 4, 8), eps=(1, 2, 4, 8)):
    for tp in tps:
        for ep in (eps if is_moe else (1,)):
            for placement in (("ep", "replicate") if ep > 1 else ("ep",)):
                yield tp, ep, placement


def with_batch(config, dp: int):
    train = dataclasses.replace(config.train, global_batch_size=dp, micro_batch_size=1)
    return dataclasses.replace(config, train=train)


def plan_model_method(model_config: str, run_config: str, machine, tps, eps) -> list[dict]:
    base = plan_run_config(run_config, ["data.seq_len=1024"], model_config)
    rows = []
    for tp, ep, placement in layouts(base.adapter.is_moe, tps, eps):
        reference = tp * ep  # the smallest world of this layout: dp = ep
        config = with_batch(with_layout(base, tp, ep, placement), ep)
        try:
            with fake_rank(reference, 0, tp, ep, base.adapter.num_experts if base.adapter.is_moe else None) as groups:
                model, decisions = build_rank_model(config, groups)
                local = local_experts_model(config, model, decisions, groups)
                memory = rank_memory(config, model, decisions, local)
                counted = count_micro_batch(local, config)
                for world in WORLDS:
                    if world % reference:
                        continue
                    dp = validate_layout(world, tp, ep, base.adapter.num_experts if base.adapter.is_moe else None)
                    sizes = ParallelGroups(tp=tp, dp=dp, ep=ep)
                    prediction = predict_step(model, local, decisions, with_batch(config, dp), sizes, machine,
                                              counted=counted)
                    total = memory.total(config.train.activation_checkpointing)
                    rows.append(dict(world=world, tp=tp, ep=ep, placement=placement, memory_bytes=total,
                                     fits=total <= machine.memory_bytes, memory=dataclasses.asdict(memory),
                                     **prediction.to_dict(), exchange_share=prediction.exchange_s / prediction.step_s))
        except ValueError as err:
            rows.append(dict(tp=tp, ep=ep, placement=placement, error=str(err)))
        print(f"  {tp=} {ep=} {placement}", file=sys.stderr, flush=True)
    return rows


def layout_name(r: dict) -> str:
    return f"tp={r['tp']} ep={r['ep']}" + (f" {r['placement']}" if r["ep"] > 1 else "")


def best(rows: list, world: int):
    fitting = [r for r in rows if r.get("world") == world and r["fits"]]
    return max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None


def markdown(results: dict) -> str:
    out = ["| model | method | GPUs | layout (best that fits) | GiB per rank | tokens/s | exchange share "
           "| best ep layout (tokens/s, exchange share) |",
           "|---|---|---|---|---|---|---|---|"]
    for model, methods in results.items():
        for method, rows in methods.items():
            for world in WORLDS:
                b = best(rows, world)
                if b is None:
                    out.append(f"| {model} | {method} | {world} | nothing fits | | | | |")
                    continue
                eps = [r for r in rows
                       if r.get("world") == world and r["fits"] and r["placement"] == "ep" and r["ep"] > 1]
                ep_best = max(eps, key=lambda r: r["tokens_per_s"]) if eps else None
                ep_text = (f"tp={ep_best['tp']} ep={ep_best['ep']}: {ep_best['tokens_per_s']:,.0f}, "
                           f"{ep_best['exchange_share']:.1%}") if ep_best else "–"
                out.append(f"| {model} | {method} | {world} | {layout_name(b)} | "
                           f"{b['memory_bytes'] / GIB:.1f} | {b['tokens_per_s']:,.0f} | {b['exchange_share']:.1%} | "
                           f"{ep_text} |")
    return "\n".join(out)


def paper_setting(results: dict) -> str:
    """The paper's layout (4 GPUs, tp 1, ep 4, experts split) per model and method (LoRA: dp 4)."""
    out = ["| model | method | layout | GiB per rank (experts) | step s | tokens/s | exchange share |",
           "|---|---|---|---|---|---|---|"]
    for model, methods in results.items():
        for method, rows in methods.items():
            ep = 1 if method == "LoRA" else 4
            for r in rows:
                if r.get("world") == 4 and r["tp"] == 1 and r["ep"] == ep and r["placement"] == "ep":
                    out.append(f"| {model} | {method} | tp=1 ep={ep} | {r['memory_bytes'] / GIB:.1f} "
                               f"({r['memory']['expert_bytes'] / GIB:.2f}) | {r['step_s']:.3f} | "
                               f"{r['tokens_per_s']:,.0f} | {r['exchange_share']:.1%} |")
    return "\n".join(out)


def malora_against_molora(results: dict) -> str:
    """Per model and world: the best layout of each, and the exchange share at the same ep layout."""
    out = ["| model | GPUs | best MALoRA | best MoLoRA | ep-split layout | MALoRA exchange share "
           "| MoLoRA exchange share |",
           "|---|---|---|---|---|---|---|"]
    for model, methods in results.items():
        if "MALoRA" not in methods or "MoLoRA" not in methods:
            continue
        for world in WORLDS:
            a, b = best(methods["MALoRA"], world), best(methods["MoLoRA"], world)
            if a is None or b is None:
                continue
            split = [(ra, rb) for ra in methods["MALoRA"] for rb in methods["MoLoRA"]
                     if ra.get("world") == world == rb.get("world") and ra["placement"] == rb["placement"] == "ep"
                     and ra["ep"] > 1 and (ra["tp"], ra["ep"]) == (rb["tp"], rb["ep"]) and ra["fits"]]
            if not split:
                continue
            ra, rb = max(split, key=lambda pair: pair[0]["tokens_per_s"])
            out.append(f"| {model} | {world} | {layout_name(a)} | {layout_name(b)} | tp={ra['tp']} ep={ra['ep']} | "
                       f"{ra['exchange_share']:.1%} | {rb['exchange_share']:.1%} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machine", default="h100")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--tp", nargs="*", type=int, default=[1, 2, 4, 8], help="tp sizes to build")
    parser.add_argument("--ep", nargs="*", type=int, default=[1, 2, 4, 8], help="ep sizes to build")
    parser.add_argument("--json")
    args = parser.parse_args()
    machine = load_machine(args.machine)
    results: dict = {}
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            results = json.load(f)["results"]
    for model in args.models:
        for method, run_config in METHODS.items():
            if method in results.get(model, {}):
                continue
            print(f"{model} {method}", file=sys.stderr, flush=True)
            results.setdefault(model, {})[method] = plan_model_method(MODELS[model], run_config, machine, args.tp,
                                                                      args.ep)
            if args.json:  # written as it goes: a long run keeps what it finished
                with open(args.json, "w") as f:
                    json.dump({"machine": machine.to_dict(), "results": results}, f, indent=1)
    print(markdown(results))
    print()
    print(paper_setting(results))
    print()
    print(malora_against_molora(results))


if __name__ == "__main__":
    main()
