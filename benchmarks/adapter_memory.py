"""Adapter memory per rank when experts are split over the EP group: each rank builds only its own.

    python benchmarks/adapter_memory.py            # SmolLM2-135M's shapes, MALoRA r=8, N=8; ep = 1, 2, 4

For each ep, a gloo world of ep processes builds the adapters of every target linear of a random
model with SmolLM2-135M's shapes (30 layers, 576 → 1536) for placement ``ep``; each rank reports
the bytes of its expert tensors (P_t, B̄_t), of all its adapter tensors, and how much its resident
memory grew while the adapters were built. Prints a table and writes ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SMOLLM2 = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, vocab_size=1024, max_position_embeddings=256,
               tie_word_embeddings=True)
ADAPTER = dict(method="malora", rank=8, num_experts=8, top_k=2)


def measure(ep: int) -> dict:
    from malora_dist.adapters.inject import adapter_layers
    from malora_dist.config.adapter import AdapterConfig
    from malora_dist.models import build_tiny_causal_lm
    from malora_dist.parallel.parallelize import build_adapters
    from malora_dist.runtime.groups import ParallelGroups

    groups = ParallelGroups.build(tp=1, ep=ep) if ep > 1 else ParallelGroups.single()
    model = build_tiny_causal_lm(SMOLLM2, seed=0)
    gc.collect()
    before = psutil.Process().memory_info().rss
    build_adapters(model, AdapterConfig(**ADAPTER), groups, placement="ep")
    gc.collect()
    grown = psutil.Process().memory_info().rss - before
    experts = total = 0
    for _, layer in adapter_layers(model):
        for name, param in layer.adapter_tensors():
            size = param.numel() * param.element_size()
            total += size
            experts += size if name.startswith("expert") else 0
    return {"expert_bytes": experts, "adapter_bytes": total, "rss_growth_bytes": grown}


def main(argv=None) -> int:
    from malora_dist.runtime.local_world import run_local_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default="benchmarks/results/adapter_memory.json")
    args = parser.parse_args(argv)
    results = {ep: run_local_world(ep, measure, ep) for ep in args.ep}
    mib = 1 << 20
    print("| ep | expert tensors per rank (MiB) | ÷ ep=1 | all adapter tensors per rank (MiB) "
          "| RSS growth while building, max rank (MiB) |")
    print("|---|---|---|---|---|")
    first = results[args.ep[0]][0]["expert_bytes"]
    for ep, ranks in results.items():
        worst = max(ranks, key=lambda r: r["rss_growth_bytes"])
        print(f"| {ep} | {ranks[0]['expert_bytes'] / mib:.2f} | {ranks[0]['expert_bytes'] / first:.3f} | "
              f"{ranks[0]['adapter_bytes'] / mib:.2f} | {worst['rss_growth_bytes'] / mib:.1f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": SMOLLM2, "adapter": ADAPTER, "results": {str(k): v for k, v in results.items()}}, f,
                  indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
