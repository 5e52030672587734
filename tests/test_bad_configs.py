"""Bad run configs are rejected before anything starts, by a ValueError that names the key.

Each case changes configs/tiny.yaml (a valid config for 1, 2 and 4 ranks) in one place and is
checked the way ``launch/train.py`` checks a config: ``build_run_config`` then
``validate_run(config, world_size)``. The entry point itself is run for ``--dry-run`` (a 32-rank
layout validated on one machine) and for a bad config, which must exit with code 2 and the message.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
from training_support import REPO, TINY

from malora_dist.config.loading import load_yaml
from malora_dist.config.run import apply_overrides, build_run_config, load_run_config
from malora_dist.train.preflight import validate_run

BASE = load_yaml(TINY)


def merged(base, changes):
    """``base`` with ``changes`` merged in per key, recursively (None deletes a key)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def with_model(**config):
    return {"model": {"config": config}}


# A llama plan with packed experts beside its linears, a style the base does not implement: written
# here so that the refusal is tested whatever plans a transformers release ships.
PLAN_WITH_PACKED_EXPERTS = {
    **{f"layers.*.self_attn.{p}_proj": "colwise" for p in "qkv"}, "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
    "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
}

TRAINED = {"name": "a", "paths": "synthetic:parity"}
EVAL_ONLY = {"name": "b", "eval_paths": "synthetic:capitals", "eval_only": True}

# id -> (changes to configs/tiny.yaml, world size, strings the message must contain)
CASES = {
    # structure
    "unknown section": ({"optimizer": {"lr": 0.001}}, 1, ["optimizer"]),
    "unknown train key": ({"train": {"learning_rate": 0.001}}, 1, ["train.learning_rate"]),
    "unknown adapter key": ({"adapter": {"ranks": 4}}, 1, ["adapter.ranks"]),
    "unknown parallel key": ({"parallel": {"pp": 2}}, 2, ["parallel.pp"]),
    "two model sources": ({"model": {"gguf_file": "smollm2"}}, 1, ["model.config", "model.gguf_file"]),
    "missing gguf file": ({"model": {"config": None, "gguf_file": "/nonexistent/model.gguf"}}, 1, ["model.gguf_file"]),
    "model without a tp plan at tp 2": ({**with_model(model_type="gpt2"), "parallel": {"tp": 2}}, 2,
                                        ["parallel.tp", "gpt2", "base_model_tp_plan", "tp: 1"]),
    "tp plan style not implemented": ({**with_model(base_model_tp_plan=PLAN_WITH_PACKED_EXPERTS),
                                       "parallel": {"tp": 2}},
                                      2, ["parallel.tp", "'packed_colwise' on layers.*.mlp.experts.gate_up_proj"]),
    # layout
    "tp does not divide world": ({"parallel": {"tp": 2}}, 3, ["parallel.tp"]),
    "tp zero": ({"parallel": {"tp": 0}}, 1, ["parallel.tp"]),
    "share_exchanges not a bool": ({"parallel": {"share_exchanges": "yes"}}, 1,
                                   ["parallel.share_exchanges", "true or false"]),
    "ep does not divide dp": ({"parallel": {"ep": 4}}, 2, ["parallel.ep", "dp"]),
    "ep does not divide num_experts": ({"adapter": {"num_experts": 6}, "parallel": {"ep": 4}}, 4,
                                       ["parallel.ep", "adapter.num_experts"]),
    "ep without experts": ({"adapter": {"method": "lora"}, "parallel": {"ep": 2}}, 2, ["parallel.ep"]),
    "tp vs heads": ({"parallel": {"tp": 3}}, 3, ["parallel.tp", "num_attention_heads=4"]),
    "tp vs KV heads": ({**with_model(num_key_value_heads=2), "parallel": {"tp": 4}}, 4,
                       ["parallel.tp", "num_key_value_heads=2"]),
    "timeout not positive": ({"parallel": {"timeout_s": 0}}, 1, ["parallel.timeout_s"]),
    "timeout not a number": ({"parallel": {"timeout_s": "ten"}}, 1, ["parallel.timeout_s"]),
    # adapter
    "unknown method": ({"adapter": {"method": "moelora"}}, 1, ["adapter.method"]),
    "top_k > num_experts": ({"adapter": {"top_k": 5}}, 1, ["adapter.top_k"]),
    "unknown target module": ({"adapter": {"target_modules": ["q_proj", "o_projection"]}}, 1,
                              ["adapter.target_modules", "o_projection"]),
    "target not in the model's plan": ({**with_model(model_type="phi3"), "adapter": {"target_modules": ["q_proj"]}},
                                       1, ["adapter.target_modules ['q_proj']", "qkv_proj", "gate_up_proj"]),
    "MALoRA d not integral": ({"adapter": {"lam": 0.3}}, 1, ["adapter.shared_dim"]),  # d = 0.3·4·4
    "MALoRA r̄ not integral": ({"adapter": {"rank": 3, "lam": 0.5}}, 1, ["adapter.expert_rank"]),  # r̄ = 4.5
    "MALoRA r̄ > d": ({"adapter": {"num_experts": 2, "top_k": 1, "lam": 0.5}}, 1, ["adapter.lam", "r̄=6 > d=4"]),
    "MALoRA d > n": ({"adapter": {"shared_dim": 128, "expert_rank": 4}}, 1, ["adapter.shared_dim", "n=64"]),
    # training
    "negative lr": ({"train": {"lr": -0.001}}, 1, ["train.lr"]),
    "lr as YAML text": ({"train": {"lr": "3e-4"}}, 1, ["train.lr", "decimal point"]),  # what `lr: 3e-4` loads as
    "bad schedule": ({"train": {"schedule": "cosin"}}, 1, ["train.schedule"]),
    "warmup ratio 1": ({"train": {"warmup_ratio": 1.0}}, 1, ["train.warmup_ratio"]),
    "steps and epochs": ({"train": {"epochs": 1.0}}, 1, ["train.steps", "train.epochs"]),
    "neither steps nor epochs": ({"train": {"steps": None}}, 1, ["train.steps", "train.epochs"]),
    "steps a boolean": ({"train": {"steps": True}}, 1, ["train.steps"]),
    "seed not an integer": ({"train": {"seed": "zero"}}, 1, ["train.seed"]),
    "flag not a boolean": ({"train": {"activation_checkpointing": "yes please"}}, 1,
                           ["train.activation_checkpointing"]),
    "global batch vs micro": ({"train": {"global_batch_size": 6, "micro_batch_size": 4}}, 1,
                              ["train.global_batch_size", "train.micro_batch_size"]),
    "global batch vs micro × dp": ({"train": {"global_batch_size": 8, "micro_batch_size": 2}}, 8,
                                   ["train.global_batch_size", "dp"]),
    "bad nonfinite policy": ({"train": {"nonfinite": "ignore"}}, 1, ["train.nonfinite"]),
    "zero consecutive skips": ({"train": {"max_consecutive_skips": 0}}, 1, ["train.max_consecutive_skips"]),
    "bad model dtype": ({"model": {"dtype": "fp16"}}, 1, ["model.dtype"]),
    # checkpoint
    "resume not a string": ({"checkpoint": {"resume": 5}}, 1, ["checkpoint.resume"]),
    "resume path missing": ({"checkpoint": {"resume": "/nonexistent/checkpoints/step_4"}}, 1, ["checkpoint.resume"]),
    "keep zero": ({"checkpoint": {"keep": 0}}, 1, ["checkpoint.keep"]),
    # data
    "seq_len > max_position_embeddings": ({"data": {"seq_len": 512}}, 1, ["data.seq_len", "max_position_embeddings"]),
    "bad mixing": ({"data": {"mixing": "random"}}, 1, ["data.mixing"]),
    "temperature without temperature mixing": ({"data": {"temperature": 2.0}}, 1, ["data.temperature"]),
    "temperature not positive": ({"data": {"mixing": "temperature", "temperature": 0}}, 1, ["data.temperature"]),
    "task without paths": ({"data": {"tasks": [{"name": "a"}]}}, 1, ["data.tasks[0].paths"]),
    "task paths match no file": ({"data": {"tasks": [{"name": "a", "paths": "synthetic:parity"},
                                                     {"name": "b", "paths": "/nonexistent/*.json"}]}}, 1,
                                 ["data.tasks[1].paths", "/nonexistent/*.json"]),
    "task eval_paths missing": ({"data": {"tasks": [{"name": "a", "paths": "synthetic:parity",
                                                     "eval_paths": "/nonexistent/test.json"}]}}, 1,
                                ["data.tasks[0].eval_paths"]),
    "bad overlong policy": ({"data": {"overlong": "wrap"}}, 1, ["data.overlong"]),
    # eval_only: a held-out set and no training keys
    "eval_only not a flag": ({"data": {"tasks": [TRAINED, {**EVAL_ONLY, "eval_only": "yes"}]}}, 1,
                             ["data.tasks[1].eval_only"]),
    "eval_only with paths": ({"data": {"tasks": [TRAINED, {**EVAL_ONLY, "paths": "synthetic:larger"}]}}, 1,
                             ["data.tasks[1].paths", "eval_paths"]),
    "eval_only without a held-out set": ({"data": {"tasks": [TRAINED, {"name": "b", "eval_only": True}]}}, 1,
                                         ["data.tasks[1].eval_only", "eval_paths", "eval_split"]),
    "eval_only hub without eval_split": ({"data": {"tasks": [TRAINED, {"name": "b", "hub": "openai/gsm8k",
                                                                       "format": "gsm8k", "eval_only": True}]}}, 1,
                                         ["data.tasks[1].eval_split"]),
    "eval_only with split": ({"data": {"tasks": [TRAINED, {"name": "b", "hub": "openai/gsm8k", "format": "gsm8k",
                                                           "eval_only": True, "eval_split": "test",
                                                           "split": "train"}]}},
                             1, ["data.tasks[1].split", "eval_only"]),
    "eval_only with limit": ({"data": {"tasks": [TRAINED, {**EVAL_ONLY, "limit": 5}]}}, 1, ["data.tasks[1].limit"]),
    "eval_only with weight": ({"data": {"tasks": [TRAINED, {**EVAL_ONLY, "weight": 2.0}]}}, 1,
                              ["data.tasks[1].weight"]),
    "every task eval_only": ({"data": {"tasks": [EVAL_ONLY]}}, 1, ["data.tasks", "eval_only"]),
}


def check(data: dict, world: int) -> None:
    validate_run(build_run_config(data), world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_base_config_is_valid(world):
    check(copy.deepcopy(BASE), world)  # so each case below fails only because of its change


@pytest.mark.parametrize("changes,world,keys", list(CASES.values()), ids=list(CASES))
def test_bad_config_is_rejected_naming_the_key(changes, world, keys):
    with pytest.raises(ValueError) as err:
        check(merged(BASE, changes), world)
    for key in keys:
        assert key in str(err.value), (key, str(err.value))


@pytest.mark.parametrize("item,key", [
    ("optimizer.lr=0.1", "optimizer"),  # not a section
    ("train.lr", "train.lr"),  # no value
    ("train.lr=[1", "train.lr"),  # not YAML
    ("train.lr=3e-4", "train.lr"),  # YAML 1.1: text
])
def test_bad_override_is_rejected_naming_the_key(item, key):
    with pytest.raises(ValueError) as err:
        validate_run(load_run_config(TINY, [item]), 1)
    assert key in str(err.value)


def test_override_reaches_the_config():
    data = apply_overrides(copy.deepcopy(BASE), ["parallel.tp=2", "adapter.target_modules=[q_proj, v_proj]"])
    config = build_run_config(data)
    assert config.parallel.tp == 2 and config.adapter.target_modules == ["q_proj", "v_proj"]


def test_launcher_dry_run_and_bad_config_exit_code(tmp_path):
    """The real entry point, all three at once (start-up dominates): a 32-rank dry run, the same
    dry run with a bad layout, and a real (not dry) start with a bad layout. The bad ones exit 2
    with the message on stderr and leave nothing behind."""
    out = tmp_path / "never_created"
    common = [sys.executable, "launch/train.py", "--config", TINY, "--set", f"train.output_dir={out}"]
    runs = {
        # dp = 8 needs a global batch of micro_batch_size (2) × 8 · k: tiny.yaml's 8 is rejected.
        "dry_ok": common + ["--dry-run", "--world-size", "32", "--set", "parallel.tp=4", "--set", "parallel.ep=4",
                            "--set", "train.global_batch_size=16"],
        "dry_bad": common + ["--dry-run", "--world-size", "32", "--set", "parallel.tp=3"],
        "start_bad": common + ["--set", "parallel.ep=3"],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in runs.items()}
    results = {name: (*p.communicate(timeout=180), p.returncode) for name, p in procs.items()}

    stdout, stderr, code = results["dry_ok"]
    assert code == 0, stderr[-2000:]
    assert "config OK for 32 rank(s): tp=4, ep=4, dp=8" in stdout
    for name, key in (("dry_bad", "parallel.tp=3"), ("start_bad", "parallel.ep=3")):
        stdout, stderr, code = results[name]
        assert code == 2, (name, stderr[-2000:])
        assert f"error: {key}" in stderr and "Traceback" not in stderr, (name, stderr[-2000:])
        assert "training" not in stderr  # nothing started
    assert not out.exists()
