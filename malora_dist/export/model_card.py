"""The model card (``README.md``) written beside an exported adapter.

It says what the adapter is and how it was made, from the run's config and what the run directory
(``RUN``, the parent of ``RUN/checkpoints/step_N``) recorded: the base model, the method and its
shape, the parameter counts, the data and steps, the held-out losses logged up to the exported step
and the evaluation reports of this run's final adapter (when the export is that step), the export
command, and the Python lines that load the adapter with PEFT.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Optional

from malora_dist.adapters.file_format import PEFT_TYPE
from malora_dist.adapters.parameter_count import parameter_report
from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.loading import without_defaults
from malora_dist.config.run import RunConfig

README = "README.md"
METHOD_NAMES = {"lora": "LoRA", "molora": "MoLoRA", "malora": "MALoRA", "hydralora": "HydraLoRA"}


def write_model_card(out: str, config: RunConfig, hf_config, step: int, run_dir: Optional[str],
                     config_path: Optional[str], command: Optional[str]) -> str:
    """Write ``out/README.md``; ``hf_config``: the base's Hugging Face config (for the counts);
    ``config_path``: the run config the loading lines read for a base that has no hub name."""
    adapter = config.adapter
    sections = [
        _front_matter(config),
        f"# {METHOD_NAMES[adapter.method]} adapter of {_base_name(config)}\n\n"
        f"Trained with malora_dist and exported from step {step} of its run"
        f"{f' (`{run_dir}`)' if run_dir else ''}.",
        "## Base model\n\n" + _base_description(config),
        "## Method and shape\n\n" + _shape(adapter, parameter_report(hf_config, adapter)),
        "## Data and steps\n\n" + _training(config, step, run_dir),
        "## Held-out scores\n\n" + _scores(run_dir, step),
        "## How it was made\n\n" + (f"```bash\n{command}\n```" if command else
                                     "Exported from Python with `malora_dist.export.checkpoint.export_checkpoint`."),
        "## Load it with PEFT\n\n" + _loading(config, out, config_path),
    ]
    path = os.path.join(out, README)
    with open(path, "w") as f:
        f.write("\n\n".join(sections) + "\n")
    return path


def _front_matter(config: RunConfig) -> str:
    lines = ["---", "library_name: peft"]
    if config.model.name_or_path:
        lines.append(f"base_model: {config.model.name_or_path}")
    lines += ["tags:", "- malora_dist", f"- {config.adapter.method}", "---"]
    return "\n".join(lines)


def _base_name(config: RunConfig) -> str:
    model = config.model
    if model.name_or_path:
        return f"`{model.name_or_path}`"
    if model.gguf_file:
        return f"the GGUF model `{model.gguf_file}`"
    return f"a randomly initialised {model.config.get('model_type', '')} model".replace("  ", " ")


def _base_description(config: RunConfig) -> str:
    model = config.model
    if model.name_or_path:
        text = f"`{model.name_or_path}` (Hugging Face name or directory)"
    elif model.gguf_file:
        text = f"the GGUF file `{model.gguf_file}`, dequantised"
    else:
        keys = ", ".join(f"{k}={v}" for k, v in model.config.items())
        text = f"randomly initialised from `model.config` with seed {config.train.seed}: {keys}"
    return f"{text}; frozen, in {model.dtype}."


def _shape(adapter: AdapterConfig, report: dict) -> str:
    lines = [f"- method: {adapter.method} (`peft_type: {'LORA' if adapter.method == 'lora' else PEFT_TYPE}`)"]
    if adapter.has_subspace:
        lines.append(f"- shared subspace d = {adapter.d} ({adapter.subspace}, side {adapter.shared_side}), "
                     f"expert rank r̄ = {adapter.r_bar}")
    else:
        lines.append(f"- rank r = {adapter.rank}")
    if adapter.is_moe:
        lines.append(f"- {adapter.num_experts} experts, top-{adapter.top_k} routing"
                     f"{', gates renormalised' if adapter.normalize_gates else ''}"
                     f"{f', capacity factor {adapter.capacity_factor}' if adapter.capacity_factor else ''}")
    lines.append(f"- scaling α/{'r̄' if adapter.has_subspace else 'r'} = {adapter.scaling:g}; "
                 f"dropout {adapter.dropout:g}{'; DoRA' if adapter.dora else ''}")
    lines.append(f"- adapted linears: {', '.join(adapter.target_modules)} ({report['adapted_layers']} layers)")
    if adapter.frozen_parts:
        lines.append(f"- kept at their initial values: {', '.join(sorted(adapter.frozen_parts))}")
    lines.append(f"- trainable parameters: {report['trainable_params']:,} ({report['trainable_percent']:.3f}% of the "
                 f"base's {report['base_params']:,})"
                 + (f"; frozen adapter parameters: {report['frozen_adapter_params']:,}"
                    if report["frozen_adapter_params"] else ""))
    return "\n".join(lines)


def _training(config: RunConfig, step: int, run_dir: Optional[str]) -> str:
    train, data = config.train, config.data
    planned = f"{train.steps} steps" if train.steps is not None else f"{train.epochs} epoch(s)"
    lines = [f"- exported step: {step} (the run was configured for {planned})",
             f"- global batch {train.global_batch_size} sequences of {data.seq_len} tokens "
             f"(micro-batch {train.micro_batch_size}), lr {train.lr:g}, seed {train.seed}",
             f"- task mixing: {data.mixing}"]
    for task in without_defaults(data.tasks):
        name = task.pop("name")
        lines.append(f"- task `{name}`: " + ", ".join(f"{k}={v}" for k, v in task.items()))
    layout = _read_json(os.path.join(run_dir, "run_info.json")) if run_dir else None
    if layout:
        lines.append(f"- trained on {layout.get('world_size')} process(es), layout {layout.get('layout')}")
    return "\n".join(lines)


def _scores(run_dir: Optional[str], step: int) -> str:
    rows = _metrics(run_dir)
    held_out = [r for r in rows if "eval_loss" in r and r.get("step", 0) <= step]
    lines = []
    if held_out:
        lines.append("Held-out loss (mean answer-token loss on the config's held-out sequences):\n")
        lines += ["| step | held-out loss |", "|---:|---:|"]
        lines += [f"| {r['step']} | {r['eval_loss']:.4f} |" for r in held_out]
    last_step = max((r.get("step", 0) for r in rows), default=None)
    reports = _evaluation_reports(run_dir) if run_dir and last_step == step else []
    for path, report in reports:
        lines.append(f"\nEvaluation of this run's final adapter (`{path}`):\n")
        lines += ["| task | metric | n | score |", "|---|---|---:|---:|"]
        lines += [f"| {name} | {e['metric']} | {e['n']} | {e['score']:.4f} |" for name, e in report["tasks"].items()]
    return "\n".join(lines) if lines else "None recorded in the run directory."


def _metrics(run_dir: Optional[str]) -> list:
    path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _evaluation_reports(run_dir: str) -> list:
    """Reports of ``launch/evaluate.py`` in the run directory or beside it (a sweep's ``eval.json``)
    that name the run's final adapter."""
    final = os.path.abspath(os.path.join(run_dir, "adapter"))
    found = []
    for path in sorted(glob.glob(os.path.join(run_dir, "*.json")) + glob.glob(os.path.join(run_dir, "..", "*.json"))):
        report = _read_json(path)
        adapter = report.get("adapter") if isinstance(report, dict) else None
        if isinstance(adapter, dict) and adapter.get("path") == final and isinstance(report.get("tasks"), dict):
            found.append((os.path.normpath(path), report))
    return found


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _loading(config: RunConfig, out: str, config_path: Optional[str]) -> str:
    """The lines that load the adapter, runnable as they are."""
    model = config.model
    lines = []
    if config.adapter.is_moe:
        lines.append(f"import malora_dist.peft_method  # registers peft_type {PEFT_TYPE} with PEFT")
    lines.append("from peft import PeftModel")
    if model.name_or_path and model.tokenizer is None:
        lines += ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({model.name_or_path!r}, dtype=torch.{model.dtype})",
                  f"tokenizer = AutoTokenizer.from_pretrained({model.name_or_path!r})"]
    else:  # a GGUF file, a random config or a tokenizer of its own: the package builds them as training did
        lines += ["from malora_dist.train.build import load_hf_base, load_run_tokenizer",
                  "from malora_dist.config.run import load_run_config", "",
                  f"run = load_run_config({os.path.abspath(config_path or 'RUN/config.yaml')!r})",
                  "base = load_hf_base(run.model, seed=run.train.seed)",
                  "tokenizer = load_run_tokenizer(run.model)"]
    lines.append(f"model = PeftModel.from_pretrained(base, {os.path.abspath(out)!r}).eval()")
    note = ("\n\nA routed mixture cannot be merged into the base weights (`merge_and_unload` says why): "
            "use the PeftModel as it is." if config.adapter.is_moe else "")
    return "```python\n" + "\n".join(lines) + "\n```" + note
