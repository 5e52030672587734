"""Trainable, frozen-adapter and base parameter counts of an adapter config on a model config, built on
the meta device (a 70B config answers in seconds), and the paper's Table 1 "params" column beside
this package's counts (``malora-params`` prints them)."""
from __future__ import annotations

from pathlib import Path

from malora_dist.adapters.parameter_count import parameter_report
from malora_dist.config.adapter import AdapterConfig
from malora_dist.models.loading import load_model_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # a checkout's configs/, beside the package
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


