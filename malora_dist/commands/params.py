"""Parameter report: ``python -m malora_dist.commands.params --model-config CONFIG --adapter-config YAML``, or
``python -m malora_dist.commands.params --paper`` for the paper's methods on LLaMA-2-7B beside its figures.

The model is built on the meta device, so a 70B config answers in seconds without allocating weights.
Prints JSON with ``base_params``, ``trainable_params``, ``frozen_adapter_params`` (parts kept at their
initial values, ``adapter.freeze``) and two percentages:

- ``trainable_percent`` = 100 × trainable / base;
- ``trainable_percent_of_all`` = 100 × trainable / (base + every adapter parameter, frozen ones
  included): PEFT's ``print_trainable_parameters`` count. It reproduces the "params" column of the
  paper's Table 1 (LoRA, AsyLoRA, DoRA, MoLoRA, MALoRA-Small, MALoRA round to its figures; the
  percent of the base does not: MALoRA 2.36 against its 2.3, AsyLoRA 2.33 against 2.2), while its
  Table 3 figure for MoLoRA r = 12 (3.3) is the percent of the base (3.31; 3.20 of all). Both are
  printed, with the paper's figure and which count matches it (``--paper``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from malora_dist.analysis.parameters import (
    CONFIGS,
    format_paper_table,
    load_model_config,
    paper_table,
    parameter_report,
)
from malora_dist.config.adapter import AdapterConfig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", help="HF config.json or a directory holding one")
    parser.add_argument("--adapter-config",
                        help="YAML with the adapter keys at top level, or a training config with an 'adapter:' section")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's methods (its shipped configs) on LLaMA-2-7B beside its 'params' figures")
    parser.add_argument("--configs-dir", default=str(CONFIGS),
                        help="where --paper finds the configs (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="--paper as JSON instead of a table")
    args = parser.parse_args(argv)
    if not args.paper and not (args.model_config and args.adapter_config):
        parser.error("give --model-config and --adapter-config, or --paper")
    try:
        if args.paper:
            rows = paper_table(Path(args.configs_dir))
            print(json.dumps(rows, indent=2) if args.json else format_paper_table(rows))
            return 0
        report = parameter_report(load_model_config(args.model_config), AdapterConfig.from_yaml(args.adapter_config))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
