"""Export the adapter of any training checkpoint as a single adapter directory.

    python -m malora_dist.commands.export --config CONFIG --checkpoint RUN/checkpoints/step_N --out DIR [--set k=v ...]

One process, whatever layout wrote the checkpoint: the DCP checkpoint's keys are the adapter file
keys of ``malora_dist.parallel.adapter_files`` (full tensors, experts by global index), so they are read into
the adapters of a skeleton of the run's model (the base on the meta device: no base weights are
read) and written by ``save_adapter``: ``adapter_config.json`` + ``adapter_model.safetensors`` in
PEFT's form (PEFT's LoRA, or the ``malora_dist`` PEFT method for MoLoRA/MALoRA/HydraLoRA), which
``PeftModel.from_pretrained`` and ``load_adapter`` both put into a plain Hugging Face model, and a
model card, ``README.md`` (``malora_dist.export.model_card``). The optimizer moments in the checkpoint are
not read.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional

from malora_dist.config.run import load_run_config
from malora_dist.export.checkpoint import export_checkpoint


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="malora-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config (RUN/config.yaml is written by training)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, RUN/checkpoints/step_N")
    parser.add_argument("--out", required=True, help="the adapter directory to write")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key, as in training (repeatable)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "malora_dist.commands.export", *argv])
    try:
        export_checkpoint(load_run_config(args.config, args.set), args.checkpoint, args.out, args.config, command)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"adapter of {args.checkpoint} and its model card written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
