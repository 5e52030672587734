"""Check a run config against the world size and the model before anything starts.

Every error names the config key and the fix. ``launch/train.py --dry-run --world-size N`` calls
this alone, so a 32-rank config can be checked on a laptop.
"""

from __future__ import annotations

import os

from transformers import AutoConfig

from malora_dist.config.run import RunConfig
from malora_dist.data.records import SYNTHETIC, _resolve
from malora_dist.models import check_plan, check_tp_divisibility
from malora_dist.models.tp_linear import LINEAR_STYLES
from malora_dist.models.tp_plan import tp_plan
from malora_dist.runtime.groups import validate_layout
from malora_dist.train.build import _gguf
from malora_dist.train.checkpoint import MARKER

KNOWN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# inputs of the intermediate size (the rest take the hidden size)
INTERMEDIATE_INPUTS = ("down_proj",)


def model_hf_config(config: RunConfig):
    """The base's HF config without loading weights; None for a hub name (checked when loaded)."""


    model = config.model
    if model.config is not None:
        fields = dict(model.config)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    if model.gguf_file is not None:
        directory, name = os.path.split(os.path.abspath(_gguf(model.gguf_file)))
        if not os.path.isfile(os.path.join(directory, name)):
            raise ValueError(f"model.gguf_file {model.gguf_file!r} does not exist")
        return AutoConfig.from_pretrained(directory, gguf_file=name, local_files_only=True)
    if os.path.isdir(model.name_or_path):
        if not os.path.isfile(os.path.join(model.name_or_path, "config.json")):
            raise ValueError(f"model.name_or_path {model.name_or_path!r} is a directory without config.json")
        return AutoConfig.from_pretrained(model.name_or_path, local_files_only=True)
    return None


def validate_run(config: RunConfig, world_size: int) -> None:

    par, train, adapter = config.parallel, config.train, config.adapter
    dp = validate_layout(world_size, par.tp, par.ep, adapter.num_experts if adapter.is_moe else None)
    if par.ep > 1 and not adapter.is_moe:
        raise ValueError(f"parallel.ep={par.ep} needs a mixture of experts: adapter.method is {adapter.method}; "
                         f"set ep: 1")
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise ValueError(
            f"train.global_batch_size={train.global_batch_size} must be a multiple of train.micro_batch_size × dp "
            f"= {train.micro_batch_size} × {dp}: choose a global batch of {train.micro_batch_size * dp}·k sequences"
        )
    if all(task.eval_only for task in config.data.tasks):
        raise ValueError("data.tasks: every task is eval_only, so there is nothing to train on: "
                         "set eval_only: false (or remove it) on at least one task")
    _check_inputs_exist(config)
    hf = model_hf_config(config)
    projections = _projections(hf)
    unknown = sorted(set(adapter.target_modules) - set(projections))
    if unknown:
        raise ValueError(f"adapter.target_modules {unknown} are not linear layers of the base model; "
                         f"choose from {projections}")
    if hf is None:
        return
    try:
        check_plan(hf, par.tp)
        check_tp_divisibility(hf, par.tp)
    except ValueError as err:
        raise ValueError(f"parallel.tp: {err}") from None
    if config.data.seq_len > hf.max_position_embeddings:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the model's context "
                         f"(max_position_embeddings={hf.max_position_embeddings}): lower data.seq_len")
    for target in adapter.target_modules:
        n = hf.intermediate_size if target in INTERMEDIATE_INPUTS else hf.hidden_size
        adapter.check_fits(n, target)


def _projections(hf) -> list[str]:
    """Adapter targets: the linears the model's tensor-parallel plan names (Phi-3's fused
    ``qkv_proj`` and ``gate_up_proj`` included), or the LLaMA names without a plan or config."""

    plan = tp_plan(hf) if hf is not None else {}
    named = [path.rsplit(".", 1)[-1] for path, style in plan.items() if style in LINEAR_STYLES]
    return list(dict.fromkeys(named)) or list(KNOWN_PROJECTIONS)


def _check_inputs_exist(config: RunConfig) -> None:
    """Local data files and the resume checkpoint, which are otherwise first opened after the
    process groups exist. Relative data paths resolve against the working directory, as in training."""

    for i, task in enumerate(config.data.tasks):
        for key in ("paths", "eval_paths"):
            local = [p for p in getattr(task, key) if not p.startswith(SYNTHETIC)]
            _resolve(local, None, f"data.tasks[{i}].{key}")
    resume = config.checkpoint.resume
    if resume not in ("auto", "never") and not os.path.exists(os.path.join(resume, MARKER)):
        raise ValueError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {MARKER} marker): "
                         f"give a checkpoints/step_N directory of a finished save, or use auto or never")
