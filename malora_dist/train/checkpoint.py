"""Sharded, layout-independent checkpoints with ``torch.distributed.checkpoint`` (DCP).

Keys are the adapter file keys of ``malora_dist.parallel.adapter_files`` (experts under their global index,
tp-sharded tensors gathered to full size), for the parameters and for AdamW's moments. Each rank
offers the experts it owns; replicas are deduplicated by DCP. So a checkpoint written at one
(tp, ep, dp) loads at any other: each rank reads the keys of the experts it owns there and slices
its tp part.

A checkpoint is written to ``checkpoints/step_<N>.tmp`` and renamed to ``step_<N>`` after every
rank has finished and rank 0 has written the ``COMPLETE`` marker; a directory without the marker
is never loaded. Adapter dropout masks are a function of (seed, step, each token's place), so no
RNG state is needed for an exact continuation.

Resuming is refused when a fingerprinted key (model, adapter, data sections) changed. The balance
loss's token set, one micro-batch, is recorded beside the fingerprint; a checkpoint that lacks the
record, or recorded another micro-batch size, still resumes, with a warning where the token sets
differ (``balance_record``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from malora_dist.adapters.inject import adapter_layers
from malora_dist.adapters.tags import is_expert
from malora_dist.adapters.variant import PER_EXPERT_PARTS
from malora_dist.config.loading import field_default, without_defaults
from malora_dist.parallel.adapter_files import checkpoint_keys
from malora_dist.parallel.sharding import gather_tp, slice_tp
from malora_dist.runtime.log import get_logger
from malora_dist.train import balance_record

MARKER = "COMPLETE"
META = "meta.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Config sections whose change makes a checkpoint meaningless for this run.
FINGERPRINT_KEYS = ("model", "adapter", "data")
OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


def _value_hash(value) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_fingerprint(config) -> dict:
    """Per key of the model/adapter/data sections: a hash of its value, to name what changed.
    Top-level keys a later version adds are handled by ``fingerprint_changes``; keys inside a nested
    value (``data.tasks``) are hashed without the ones at their defaults."""
    out = {}
    for section in FINGERPRINT_KEYS:
        part = getattr(config, section)
        for f in dataclasses.fields(part):
            out[f"{section}.{f.name}"] = _value_hash(without_defaults(getattr(part, f.name)))
    return out


def _full_fingerprint(config) -> dict:
    """The hash every key had in checkpoints written before nested defaults were dropped (those still
    resume: a saved hash may match either form)."""
    full = config.to_dict()
    return {f"{section}.{key}": _value_hash(value)
            for section in FINGERPRINT_KEYS for key, value in full[section].items()}


def _default_fingerprint(config) -> dict:
    """The hash of each key's default value, where the key has one."""
    return {f"{section}.{f.name}": _value_hash(without_defaults(field_default(f)))
            for section in FINGERPRINT_KEYS for f in dataclasses.fields(getattr(config, section))
            if field_default(f) is not dataclasses.MISSING}


def fingerprint_changes(saved: dict, config) -> list[str]:
    """Keys whose value differs from the checkpoint's fingerprint. A key the checkpoint lacks (added
    to the config after it was written) counts only when it is set away from its default."""
    current, full, defaults = config_fingerprint(config), _full_fingerprint(config), _default_fingerprint(config)
    return sorted(k for k in set(saved) | set(current)
                  if saved.get(k, defaults.get(k)) not in (current.get(k), full.get(k)))


def _entries(model, groups):
    """(key, param, local expert index or None) for every tensor this rank offers or needs."""
    for name, layer in adapter_layers(model):
        for suffix, param in layer.adapter_tensors():
            keys = checkpoint_keys(name, suffix, layer.num_experts, layer.method)
            if suffix not in PER_EXPERT_PARTS:
                yield keys[0], param, None
            elif is_expert(param):
                for j in range(layer.num_local_experts):
                    yield keys[layer.expert_offset + j], param, j
            else:
                yield keys[0], param, 0


def list_checkpoints(root: str) -> list:
    """(step, path, complete) for each step directory, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for entry in os.listdir(root):
        match = STEP_DIR.match(entry)
        if match:
            path = os.path.join(root, entry)
            found.append((int(match.group(1)), path, os.path.exists(os.path.join(path, MARKER))))
    return sorted(found)


class CheckpointManager:
    def __init__(self, config, groups, trainer):
        self.config = config
        self.groups = groups
        self.trainer = trainer
        self.root = os.path.join(config.train.output_dir, "checkpoints")
        self.log = get_logger()

    # ---- state ---------------------------------------------------------------------------
    def _optimizer_state(self, param) -> dict:
        state = self.trainer.optimizer.state[param]
        if not state:  # AdamW creates its state lazily: give it zeros to load into
            # step next to the parameter: the fused AdamW kernel takes it on the parameter's device (CUDA)
            state.update(step=torch.zeros((), dtype=torch.float32, device=param.device),
                         exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        return state

    def _state_dict(self) -> dict:
        state = {}
        for key, param, j in _entries(self.trainer.model, self.groups):
            tensors = {"": param.data, **{f".{m}": self._optimizer_state(param)[m] for m in OPTIMIZER_MOMENTS}}
            for tag, value in tensors.items():
                full = gather_tp(value, param, self.groups)
                state[f"{key}{tag}"] = (full[j] if j is not None else full).clone()
        return state

    def _load_state_dict(self, state: dict) -> None:
        by_param = {}
        for key, param, j in _entries(self.trainer.model, self.groups):
            by_param.setdefault(id(param), (param, []))[1].append((key, j))
        for param, entries in by_param.values():
            optimizer_state = self._optimizer_state(param)
            for tag, target in [("", param.data)] + [(f".{m}", optimizer_state[m]) for m in OPTIMIZER_MOMENTS]:
                parts = [state[f"{key}{tag}"] for key, _ in entries]
                full = torch.stack(parts) if entries[0][1] is not None else parts[0]
                with torch.no_grad():
                    target.copy_(slice_tp(full, param, self.groups))

    # ---- save ----------------------------------------------------------------------------
    def due(self) -> bool:
        interval = self.config.checkpoint.interval
        step = self.trainer.step
        return step > 0 and ((interval and step % interval == 0) or step == self.trainer.total_steps)

    def save(self) -> str:
        step = self.trainer.step
        final = os.path.join(self.root, f"step_{step}")
        tmp = final + ".tmp"
        rank0 = dist.get_rank() == 0
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        dcp.save(self._state_dict(), checkpoint_id=tmp)
        dist.barrier()
        if rank0:
            meta = {
                "step": step,
                "skipped_steps": self.trainer.skipped_steps,
                "optimizer_steps_taken": self._adam_step(),
                "fingerprint": config_fingerprint(self.config),
                "layout": {"tp": self.groups.tp, "dp": self.groups.dp, "ep": self.groups.ep},
                balance_record.KEY: balance_record.balance_record(self.config),
            }
            with open(os.path.join(tmp, META), "w") as f:
                json.dump(meta, f, indent=2)
            with open(os.path.join(tmp, MARKER), "w") as f:
                f.write("ok\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune()
        dist.barrier()
        self.log.info("checkpoint saved: %s", final)
        return final

    def _adam_step(self) -> float:
        for param in self.trainer.params:
            state = self.trainer.optimizer.state.get(param)
            if state:
                return float(state["step"])
        return 0.0

    def _prune(self) -> None:
        complete = [(s, p) for s, p, ok in list_checkpoints(self.root) if ok]
        for _, path in complete[: -self.config.checkpoint.keep]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- resume --------------------------------------------------------------------------
    def newest_complete(self) -> Optional[str]:
        newest = None
        for step, path, complete in list_checkpoints(self.root):
            if complete:
                newest = path
            else:
                warnings.warn(f"skipping incomplete checkpoint {path} (no {MARKER} marker: the run stopped "
                              f"while writing it)")
        return newest

    def resume_or_start(self) -> None:
        mode = self.config.checkpoint.resume
        if mode == "never":
            if any(ok for _, _, ok in list_checkpoints(self.root)):
                raise ValueError(
                    f"{self.config.train.output_dir} already holds checkpoints and checkpoint.resume is never: "
                    f"choose another train.output_dir, or set checkpoint.resume: auto to continue"
                )
            self.trainer.metrics.truncate_after(0)
            return
        path = self.newest_complete() if mode == "auto" else mode
        if path is None:
            self.trainer.metrics.truncate_after(0)
            return
        self.load(path)

    def load(self, path: str) -> None:
        meta_path = os.path.join(path, META)
        if not os.path.exists(os.path.join(path, MARKER)) or not os.path.exists(meta_path):
            raise ValueError(f"checkpoint.resume={path!r} is not a complete checkpoint (no {MARKER} marker or {META})")
        with open(meta_path) as f:
            meta = json.load(f)
        changed = fingerprint_changes(meta["fingerprint"], self.config)
        if changed:
            raise ValueError(f"cannot resume from {path}: the config changed {changed} since it was saved; "
                             f"restore them, or start a fresh run in another train.output_dir")
        note = balance_record.resume_warning(meta, self.config, path)
        if note is not None:
            warnings.warn(note)
        state = self._state_dict()  # the right keys and shapes, to be filled in place
        dcp.load(state, checkpoint_id=path)
        self._load_state_dict(state)
        steps_taken = meta["optimizer_steps_taken"]
        optimizer_state = self.trainer.optimizer.state
        for param in self.trainer.params:
            optimizer_state[param]["step"] = torch.tensor(steps_taken, dtype=torch.float32, device=param.device)
        self.trainer.step = meta["step"]
        self.trainer.skipped_steps = meta["skipped_steps"]
        scheduler = self.trainer.scheduler
        scheduler.last_epoch = meta["step"]
        for group, factor in zip(self.trainer.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(meta["step"])
        scheduler._last_lr = [group["lr"] for group in self.trainer.optimizer.param_groups]
        self.trainer.metrics.truncate_after(meta["step"])
        self.log.info("resumed from %s at step %d", path, meta["step"])
