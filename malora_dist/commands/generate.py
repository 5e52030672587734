"""``malora-generate`` / ``launch/generate.py``: answer prompts with the base model, or base + adapter.

    malora-generate --config CONFIG [--adapter DIR] [--prompts FILE] [--max-new-tokens 64]
                    [--temperature T --top-p P --seed S] [--chat | --no-chat] [--output FILE.jsonl]
    echo '"Question: In which city is the government of Ermania seated?\\nAnswer:"' \\
        | malora-generate --config configs/demo.yaml --adapter runs/demo/adapter
    torchrun --nproc_per_node 2 launch/generate.py --config CONFIG --adapter DIR --prompts FILE

Prompts: one per line of ``--prompts`` (or of stdin without it, read by rank 0); blank lines are
skipped, and a line in double quotes is a JSON string (a prompt with newlines). The base
model comes from the run config; ``--chat`` (default: the config's ``data.use_chat_template``) wraps
each prompt in the tokenizer's chat template, as training did. ``--temperature 0`` (the default)
decodes greedily. One process decodes with a plain Hugging Face model (adapter injected);
under torchrun / srun the run's tensor-parallel model decodes in the config's layout (shrunk to
what the world holds, as for evaluation), the prompts split over dp, every rank in step. Both
decode against the KV cache; ``--no-cache`` recomputes the whole sequence per token. Rank 0 prints each answer and
writes ``--output`` (one JSON object per prompt: prompt, text, token_ids).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

from malora_dist.config.loading import read_text
from malora_dist.inference.answers import generate_all, share_from_rank0
from malora_dist.inference.decoding import Sampling
from malora_dist.inference.model import serving_config, validate_eval_layout
from malora_dist.runtime.distributed import init_distributed, shutdown_distributed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malora-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (its model:, parallel: and data: sections)")
    parser.add_argument("--adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--prompts", help="text file with one prompt per line (default: stdin)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                        help="decode against the KV cache (default); --no-cache recomputes the whole sequence "
                             "per token")
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="wrap prompts in the chat template (default: the config's data.use_chat_template)")
    parser.add_argument("--output", help="write the answers as JSON lines to this file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key; the value is parsed as YAML (repeatable)")
    return parser


def read_prompts(path: Optional[str]) -> list[str]:
    """One prompt per non-blank line; a line in double quotes is a JSON string, so that a prompt
    can hold newlines (``"Question: ...\\nAnswer:"``, the demo's training format)."""
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"--prompts {path!r} is not a file")
    text = read_text(path, "--prompts") if path is not None else sys.stdin.read()
    prompts = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if line.startswith('"'):
            try:
                line = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path or 'stdin'} line {number}: a prompt in double quotes must be a "
                                 f"JSON string ({err.msg})") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"no prompts in {path or 'stdin'}: give one prompt per line")
    return prompts


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed, args.cache)
        config, launch, adapter = serving_config(args.config, args.set, args.adapter)
        validate_eval_layout(config, launch.world_size, adapter)
        # torchrun and srun connect stdin to the first rank only: it reads and shares the prompts.
        prompts = read_prompts(args.prompts) if args.prompts is not None or launch.rank == 0 else None
        chat = config.data.use_chat_template if args.chat is None else args.chat
        init_distributed(config.parallel.timeout_s)
        try:
            prompts = share_from_rank0(prompts)
            answers = generate_all(config, args.adapter, prompts, chat, sampling)
        finally:
            shutdown_distributed()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if answers is not None:
        for answer in answers:
            print(f">>> {answer['prompt']}\n{answer['text']}\n", flush=True)
        if args.output:
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            with open(args.output, "w") as f:
                f.writelines(json.dumps(a) + "\n" for a in answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
