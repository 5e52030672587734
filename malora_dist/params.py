"""Parameter report: ``python -m malora_dist.params --model-config CONFIG --adapter-config YAML``, or
``python -m malora_dist.params --paper`` for the paper's methods on LLaMA-2-7B beside its figures.

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
import os
import sys
from pathlib import Path

import torch

from .adapters.config import AdapterConfig
from .config_utils import load_hf_config_dict
from .adapters.inject import adapter_layers, adapter_parameters, inject_adapters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER_MODEL = "models/llama2-7b.json"
# (row, shipped config under configs/, the paper's "params" figure, its table)
PAPER_ROWS = (
    ("LoRA", "paper_inter_lora.yaml", 2.1, "Table 1"),
    ("AsyLoRA", "paper_inter_asylora.yaml", 2.2, "Table 1"),
    ("DoRA", "paper_inter_dora.yaml", 2.1, "Table 1"),
    ("MoAsyLoRA", "paper_inter_moasylora.yaml", 2.3, "Table 1"),
    ("MoLoRA", "paper_inter_molora.yaml", 2.2, "Table 1"),
    ("MALoRA-Small", "paper_inter_malora_small.yaml", 1.6, "Table 1"),
    ("MALoRA", "paper_inter_malora.yaml", 2.3, "Table 1"),
    ("MoLoRA r=12", "ablations/molora_r12.yaml", 3.3, "Table 3"),
    ("MoLoRA r=12, identical A_t init", "ablations/molora_r12_identical_init.yaml", None, "Table 3"),
    ("MALoRA, fixed S_A, r̄=16", "ablations/malora_fixed_shared_A.yaml", None, "Table 3"),
    ("MALoRA, frozen P_t", "ablations/malora_frozen_P.yaml", None, "Table 3"),
    ("MALoRA, no asymmetry (r̄=8, d=64)", "ablations/malora_no_asymmetry.yaml", None, "Table 3"),
    ("MALoRA, no shared S_A (per-expert S_t)", "ablations/malora_no_shared_S_A.yaml", None, "Table 3"),
    ("MALoRA, shared subspace on B (S_B)", "ablations/malora_shared_B.yaml", None, "Table 3"),
    ("HydraLoRA-style (shared A)", "ablations/hydralora.yaml", None, "–"),
)


def load_model_config(path: str):
    """An HF ``config.json`` file or a directory holding one."""
    from transformers import AutoConfig

    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    return AutoConfig.for_model(**load_hf_config_dict(path))


def parameter_report(model_config, adapter: AdapterConfig) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    base = sum(p.numel() for p in model.parameters())
    inject_adapters(model, adapter)
    trainable = sum(p.numel() for p in adapter_parameters(model))
    every = sum(p.numel() for _, layer in adapter_layers(model) for _, p in layer.adapter_tensors())
    report = {
        "method": adapter.method,
        "base_params": base,
        "trainable_params": trainable,
        "frozen_adapter_params": every - trainable,
        "trainable_percent": 100.0 * trainable / base,
        "trainable_percent_of_all": 100.0 * trainable / (base + every),
        "adapted_layers": sum(1 for _ in adapter_layers(model)),
    }
    if adapter.is_moe:
        report.update(num_experts=adapter.num_experts, top_k=adapter.top_k)
    if adapter.has_subspace:
        report.update(shared_dim=adapter.d, expert_rank=adapter.r_bar, subspace=adapter.subspace,
                      shared_side=adapter.shared_side)
    else:
        report.update(rank=adapter.rank)
    if adapter.frozen_parts:
        report.update(frozen=sorted(adapter.frozen_parts))
    if adapter.dora:
        report.update(dora=True)
    return report


def paper_table(configs_dir: Path = CONFIGS) -> list[dict]:
    """Each of the paper's methods from its shipped config on LLaMA-2-7B, beside the paper's figure
    and whether the percent of the base or of all parameters rounds to it."""
    if not (configs_dir / PAPER_MODEL).is_file():
        raise ValueError(f"{configs_dir} holds no {PAPER_MODEL}: run --paper from a clone of the repository, "
                         f"or pass --configs-dir")
    model_config = load_model_config(str(configs_dir / PAPER_MODEL))
    rows = []
    for label, path, paper, table in PAPER_ROWS:
        report = parameter_report(model_config, AdapterConfig.from_yaml(str(configs_dir / path)))
        row = {"row": label, "config": path, "table": table, "paper_percent": paper, **report}
        if paper is not None:
            row["matches"] = [name for name in ("trainable_percent", "trainable_percent_of_all")
                              if round(report[name], 1) == paper]
        rows.append(row)
    return rows


def format_paper_table(rows: list[dict]) -> str:
    lines = [f"{'method':40s} {'config':42s} {'trainable':>12s} {'frozen':>12s} {'% base':>7s} "
             f"{'% all':>7s} {'paper':>6s}  matches"]
    for row in rows:
        paper = "" if row["paper_percent"] is None else f"{row['paper_percent']:.1f}"
        matches = ", ".join(m.replace("trainable_percent_of_all", "% all").replace("trainable_percent", "% base")
                            for m in row.get("matches", [])) or ("–" if row["paper_percent"] is None else "none")
        lines.append(f"{row['row']:40s} {row['config']:42s} {row['trainable_params']:12,d} "
                     f"{row['frozen_adapter_params']:12,d} {row['trainable_percent']:7.3f} "
                     f"{row['trainable_percent_of_all']:7.3f} {paper:>6s}  {matches}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", help="HF config.json or a directory holding one")
    parser.add_argument("--adapter-config",
                        help="YAML with the adapter keys at top level, or a training config with an 'adapter:' section")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's methods (its shipped configs) on LLaMA-2-7B beside its 'params' figures")
    parser.add_argument("--configs-dir", default=str(CONFIGS), help="where --paper finds the configs (default: %(default)s)")
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
