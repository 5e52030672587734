"""All-to-all bytes per step of one expert-parallel MoE layer, MALoRA vs MoLoRA, read from the
exchange's traffic counters in a real gloo world.

    python benchmarks/ep_traffic.py [--ranks 2 --n 4096 --m 4096 --tokens 2048]

Defaults: the paper's configurations (MoLoRA r=8, N=8, top-2; MALoRA d=32, r̄=12) on a
LLaMA-2-7B q_proj shape, 2048 tokens per rank. Forward bytes are counted (every row handed to the
all-to-all, own rows included, plus the count exchange); the backward mirrors each forward
all-to-all with one of the same size, so a training step moves twice the forward bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.runtime.groups import ParallelGroups

METHODS = {"molora": dict(method="molora", rank=8, num_experts=8, top_k=2),
           "malora": dict(method="malora", rank=8, num_experts=8, top_k=2, lam=0.5)}


def _worker(rank, world, port, args, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    groups = ParallelGroups.build(tp=1, ep=world, num_experts=8)
    result = {}
    for name, adapter in METHODS.items():
        torch.manual_seed(0)
        model = nn.ModuleDict({"proj": nn.Linear(args.n, args.m, bias=False)})
        build_adapters(model, AdapterConfig(**adapter, target_modules=["proj"]), groups, placement="ep")
        layer = model["proj"]
        x = torch.randn(args.tokens, args.n, generator=torch.Generator().manual_seed(rank))
        layer(x).sum().backward()
        t = layer.traffic
        forward = t.dispatch_bytes + t.combine_bytes + t.count_exchange_bytes
        result[name] = {"dispatch_bytes": t.dispatch_bytes, "combine_bytes": t.combine_bytes,
                        "count_exchange_bytes": t.count_exchange_bytes, "forward_bytes": forward,
                        "step_bytes": 2 * forward, "remote_bytes": t.dispatch_bytes_remote + t.combine_bytes_remote}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ep_traffic.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    mp.start_processes(_worker, args=(args.ranks, port, args, out), nprocs=args.ranks, start_method="spawn")
    with open(out) as f:
        result = json.load(f)
    slots = args.tokens * 2
    print(f"rank 0 of {args.ranks}, n={args.n} m={args.m}, {args.tokens} tokens/rank, top-2 ({slots} slots)")
    for name, r in result.items():
        print(f"  {name:7s} step bytes {r['step_bytes'] / 2**20:8.2f} MiB  (dispatch {r['dispatch_bytes']:,} B, "
              f"combine {r['combine_bytes']:,} B, counts {r['count_exchange_bytes']} B; "
              f"off-rank {r['remote_bytes']:,} B fwd)")
    ratio = result["malora"]["step_bytes"] / result["molora"]["step_bytes"]
    closed_form = (32 + args.m) / (args.n + args.m)
    print(f"  MALoRA / MoLoRA bytes per step: {ratio:.3f} (closed form 2(d+m)/2(n+m) = {closed_form:.3f})")
    return result


if __name__ == "__main__":
    main()
