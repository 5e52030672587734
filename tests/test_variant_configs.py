"""Each baseline and ablation config trains in miniature: its own adapter section (and activation
checkpointing, as it sets it) on the tiny model and synthetic data, 2 steps, then resumes for a
third; frozen parts stay at their initial values throughout and are in the adapter file."""

import os

import pytest
import torch
import yaml
from training_support import REPO, Record, synthetic_dir, tiny_config
from world import run_world

from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.run import build_run_config
from malora_dist.parallel.adapter_files import read_adapter_state
from malora_dist.train.metrics_log import read_metrics
from malora_dist.train.run import run_training

pytestmark = pytest.mark.slow  # a process world and a dozen short trainings

VARIANT_CONFIGS = ["paper_inter_asylora.yaml", "paper_inter_dora.yaml", "paper_inter_moasylora.yaml",
                   "paper_inter_malora_small.yaml"] + sorted(
    os.path.join("ablations", f) for f in os.listdir(os.path.join(REPO, "configs", "ablations")))


def miniature(path, data, output_dir, steps):
    with open(os.path.join(REPO, "configs", path)) as f:
        shipped = yaml.safe_load(f)
    config = tiny_config(data, output_dir, train=dict(
        steps=steps, global_batch_size=4, micro_batch_size=2,
        activation_checkpointing=shipped["train"].get("activation_checkpointing", False)))
    config["adapter"] = shipped["adapter"]  # the shipped adapter section, whole
    config["checkpoint"] = dict(interval=2, keep=2, resume="auto")
    return build_run_config(config)


def world_main(root):
    data = synthetic_dir(root)
    out = {}
    for path in VARIANT_CONFIGS:
        run_dir = os.path.join(root, path.replace("/", "_"))
        start, resumed = Record(), Record()
        run_training(miniature(path, data, run_dir, steps=2), start)
        run_training(miniature(path, data, run_dir, steps=3), resumed)
        out[path] = (start.start_state, resumed.start_step, run_dir)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("variants"))
    return run_world(1, world_main, root)[0]


@pytest.mark.parametrize("path", VARIANT_CONFIGS)
def test_variant_config_trains_resumes_and_keeps_frozen_parts(trained, path):
    initial, resumed_from, run_dir = trained[path]
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert resumed_from == 2
    final, _ = read_adapter_state(os.path.join(run_dir, "adapter"))  # under the checkpoint keys, as initial
    assert set(final) == set(initial)
    with open(os.path.join(REPO, "configs", path)) as f:
        adapter = AdapterConfig.from_dict(yaml.safe_load(f)["adapter"])
    frozen_suffixes = {"expert_down": (".down", "lora_A.weight"), "shared_A": (".shared_A",)}
    frozen = [k for k in final for part in adapter.frozen_parts if k.endswith(frozen_suffixes[part])]
    assert bool(frozen) == bool(adapter.frozen_parts)
    for key in final:
        same = torch.equal(final[key], initial[key])
        if key in frozen:
            assert same, key
        elif key.endswith((".up", "lora_B.weight")):
            assert not same, key  # trained
