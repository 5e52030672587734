"""Shared pieces of the training tests: the tiny run config on synthetic data, and test hooks."""

import copy
import os

import torch
import yaml

from malora_dist.data.synthetic import write_synthetic
from malora_dist.parallel.adapter_files import adapter_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
TASKS = ("capitals", "larger", "parity")


def synthetic_dir(root):
    path = os.path.join(root, "synthetic")
    if not os.path.isdir(path):
        write_synthetic(path, seed=0)
    return path


def tiny_config(data_dir, output_dir, **sections):
    """configs/tiny.yaml on files in ``data_dir``, with section overrides (dicts merged per section)."""
    with open(TINY) as f:
        config = yaml.safe_load(f)
    config["data"]["tasks"] = [
        {"name": t, "paths": os.path.join(data_dir, t, "train.json"), "limit": 64} for t in TASKS
    ]
    config["train"]["output_dir"] = output_dir
    for section, values in sections.items():
        config.setdefault(section, {}).update(copy.deepcopy(values))
    return config


class StopAfter:
    """Ask every rank to stop (as SIGTERM does) during optimizer step ``step`` (1-based)."""

    def __init__(self, step):
        self.step = step

    def fault_injector(self, step, loss):
        """Given to the trainer at construction (``run_training``'s hooks)."""
        from malora_dist.train.trainer import STOP_EVENT

        if step + 1 == self.step:
            STOP_EVENT.set()
        return loss


class Record:
    """Keep what the trainer resumed from, its adapter tensors at start, end-of-run logits, and
    how many times the decoder layers' MLPs ran (a recomputed layer runs twice per micro-batch;
    module hooks do not fire in a recompute, so the forward itself is wrapped)."""

    def __init__(self, probe_ids=None):
        self.probe_ids = probe_ids
        self.start_step = None
        self.start_state = None
        self.logits = None
        self.replica_gaps = None
        self.mlp_runs = 0

    def on_start(self, trainer):
        self.start_step = trainer.step
        self.start_state = adapter_state(trainer.model, trainer.groups)
        for layer in trainer.model.model.layers:
            layer.mlp.forward = self._counted(layer.mlp.forward)

    def _counted(self, forward):
        def run(*args, **kwargs):
            self.mlp_runs += 1
            return forward(*args, **kwargs)
        return run

    def on_end(self, trainer):
        self.mlp_runs_in_training = self.mlp_runs
        self.replica_gaps = replica_gaps(trainer.model, trainer.groups)
        if self.probe_ids is not None:
            trainer.model.eval()
            with torch.no_grad():
                self.logits = trainer.model.gather_logits(trainer.model(self.probe_ids))


def replica_gaps(model, groups):
    """Per adapter tensor: the largest difference between the copies that must be identical — the
    ranks of its tp group where it is tp-replicated, and its dp (or, for ep-sharded experts,
    expert-dp) replicas. A collective: every rank calls it."""
    import torch.distributed as dist

    from malora_dist.adapters.inject import adapter_layers
    from malora_dist.adapters.tags import is_ep_sharded, tp_dim

    def gap(tensor, group):
        if group is None:
            return 0.0
        copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(copies, tensor.contiguous(), group=group)
        return max((c - copies[0]).abs().max().item() for c in copies)

    gaps = {}
    for name, layer in adapter_layers(model):
        for suffix, param in layer.adapter_tensors():
            value = param.detach()
            across_tp = gap(value, groups.tp_group) if tp_dim(param) is None else 0.0
            across_dp = gap(value, groups.edp_group if is_ep_sharded(param) else groups.dp_group)
            gaps[f"{name}.{suffix}"] = max(across_tp, across_dp)
    return gaps


# Short runs of configs/tiny.yaml trained in one 2-process world and shared by the export, evaluation
# and PEFT tests (conftest.py's ``trained_runs``): name -> overrides. LoRA has no experts to split,
# so it trains at dp=2; the mixtures at ep=2 save their experts by global index. The MoLoRA run also
# logs held-out losses, which its model card reports.
TRAINED_RUNS = {
    "malora_ep2": ["parallel.ep=2", "train.steps=4"],
    "molora_ep2": ["adapter.method=molora", "parallel.ep=2", "train.steps=4", "data.eval_fraction=0.1",
                   "train.eval_interval=2"],
    "lora_dp2": ["adapter.method=lora", "train.steps=2"],
}


def train_runs(root):
    """Every rank of the world: train ``TRAINED_RUNS`` under ``root`` (checkpoints every 2 steps)."""
    from malora_dist.config.run import load_run_config
    from malora_dist.train.run import run_training

    for name, overrides in TRAINED_RUNS.items():
        run_training(load_run_config(TINY, [f"train.output_dir={os.path.join(root, name)}", "checkpoint.interval=2",
                                            *overrides]))
