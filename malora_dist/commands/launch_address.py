"""The master address and port of a SLURM job, for its job script (before any rank exists):

    MASTER_ADDR=$(python -m malora_dist.commands.launch_address master-addr)
    MASTER_PORT=$(python -m malora_dist.commands.launch_address master-port)

answered as SLURM's rank 0 would see them (``malora_dist.runtime.launch_env``).
"""

from __future__ import annotations

import os
import sys

from malora_dist.runtime.launch_env import resolve_launch_env


def main(argv=None) -> int:
    """``python -m malora_dist.commands.launch_address master-addr|master-port`` for job scripts."""

    args = sys.argv[1:] if argv is None else argv
    if args not in (["master-addr"], ["master-port"]):
        print("usage: python -m malora_dist.commands.launch_address master-addr|master-port", file=sys.stderr)
        return 2
    env = dict(os.environ)
    # A job script asks before any rank exists: answer as SLURM's rank 0 would.
    env.setdefault("SLURM_PROCID", "0")
    env.setdefault("SLURM_NTASKS", "1")
    try:
        launch = resolve_launch_env({k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")})
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(launch.master_addr if args == ["master-addr"] else launch.master_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
