"""Adapter files and checkpoints written before the layer was split into parts still load: their
keys are layout-free (experts by global index), and so are the new layer's."""

import os

import torch
from safetensors.torch import load_file

from malora_dist.config.run import load_run_config
from malora_dist.export.checkpoint import export_checkpoint
from malora_dist.models import build_tiny_causal_lm
from malora_dist.parallel.adapter_files import adapter_state, load_adapter

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_tiny")


def test_old_adapter_file_loads():
    saved = load_file(os.path.join(FIXTURE, "adapter", "adapter_model.safetensors"))
    config = load_run_config(os.path.join(FIXTURE, "config.yaml"))
    model = load_adapter(build_tiny_causal_lm(config.model.config, seed=0), os.path.join(FIXTURE, "adapter"))
    loaded = adapter_state(model)
    assert loaded.keys() == saved.keys() and any(".experts.3." in k for k in saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_old_checkpoint_exports_to_the_old_adapter(tmp_path):
    """The export is written in the PEFT form now (experts stacked under PEFT's names); loaded, it
    holds exactly the old file's tensors."""
    config = load_run_config(os.path.join(FIXTURE, "config.yaml"))
    out = export_checkpoint(config, os.path.join(FIXTURE, "checkpoints", "step_2"), str(tmp_path / "adapter"))
    exported = adapter_state(load_adapter(build_tiny_causal_lm(config.model.config, seed=0), out))
    saved = load_file(os.path.join(FIXTURE, "adapter", "adapter_model.safetensors"))
    assert exported.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(exported[key], value), key
    written = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any(".malora_dist_adapter.experts.down" in k for k in written)


def test_old_checkpoint_resumes_only_while_new_keys_keep_their_defaults():
    """A key added after a checkpoint was written (adapter.freeze, say) does not block resuming it
    at its default; set away from it, the change is named."""
    import json

    from malora_dist.train.checkpoint import META, fingerprint_changes

    with open(os.path.join(FIXTURE, "checkpoints", "step_2", META)) as f:
        saved = json.load(f)["fingerprint"]
    assert "adapter.freeze" not in saved
    config = load_run_config(os.path.join(FIXTURE, "config.yaml"))
    adapter_changes = lambda c: [k for k in fingerprint_changes(saved, c) if k.startswith("adapter.")]  # noqa: E731
    assert adapter_changes(config) == []
    frozen = load_run_config(os.path.join(FIXTURE, "config.yaml"), ["adapter.freeze=[expert_down]"])
    assert adapter_changes(frozen) == ["adapter.freeze"]


def test_task_keys_added_later_do_not_block_resuming():
    """The tasks' hash depends only on the task keys set away from their defaults, so a task key a
    later version adds (data.tasks[i].sample, say) does not stop a run saved before it from resuming;
    a changed task still is named, and checkpoints hashed in full (before this rule) still resume."""
    import dataclasses

    from malora_dist.train.checkpoint import _full_fingerprint, _value_hash, config_fingerprint, fingerprint_changes

    config = load_run_config(os.path.join(FIXTURE, "config.yaml"))
    saved = config_fingerprint(config)
    def default(f):
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    set_keys = [{f.name: getattr(task, f.name) for f in dataclasses.fields(task) if getattr(task, f.name) != default(f)}
                for task in config.data.tasks]
    assert all("sample" not in keys and "format" not in keys for keys in set_keys)
    assert saved["data.tasks"] == _value_hash(set_keys)
    assert fingerprint_changes(saved, config) == []
    assert fingerprint_changes(_full_fingerprint(config), config) == []
    resampled = load_run_config(os.path.join(FIXTURE, "config.yaml"))
    resampled.data.tasks[0] = dataclasses.replace(resampled.data.tasks[0], limit=None, sample=3)
    assert fingerprint_changes(saved, resampled) == ["data.tasks"]


def test_balance_loss_token_set_rule_on_resume():
    """Checkpoints record the balance loss's token set (each micro-batch). One written before that
    record, at dp=1, took the same token set and resumes silently; at dp>1 it took each round of dp
    micro-batches together, and resuming says so. A changed micro_batch_size is named; without a
    balance loss nothing is said."""
    import copy
    import json

    from malora_dist.train.balance_record import balance_record, resume_warning
    from malora_dist.train.checkpoint import META

    with open(os.path.join(FIXTURE, "checkpoints", "step_2", META)) as f:
        old = json.load(f)
    assert "balance_loss" not in old and old["layout"]["dp"] == 1
    config = load_run_config(os.path.join(FIXTURE, "config.yaml"))
    assert resume_warning(old, config, "step_2") is None
    old_dp2 = copy.deepcopy(old)
    old_dp2["layout"]["dp"] = 2
    warning = resume_warning(old_dp2, config, "step_2")
    assert "dp=2" in warning and "train.micro_batch_size=2" in warning
    new = dict(old, balance_loss=balance_record(config))
    assert new["balance_loss"] == {"definition": "micro_batch", "micro_batch_size": 2}
    assert resume_warning(dict(new, layout={"tp": 1, "dp": 4, "ep": 2}), config, "step_2") is None
    larger = load_run_config(os.path.join(FIXTURE, "config.yaml"), ["train.micro_batch_size=4"])
    assert "train.micro_batch_size=4" in resume_warning(new, larger, "step_2")
    for off in (["adapter.balance_loss_coef=0.0"], ["adapter.method=lora"]):
        assert resume_warning(old_dp2, load_run_config(os.path.join(FIXTURE, "config.yaml"), off), "step_2") is None
