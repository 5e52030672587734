"""Run a training job from a config: validate → start the process groups → build → train → export."""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from malora_dist.config.run import RunConfig, load_run_config
from malora_dist.data.pipeline import build_multitask_data
from malora_dist.parallel.adapter_files import save_adapter
from malora_dist.runtime.distributed import init_distributed, pick_backend_and_device, shutdown_distributed
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.launch_env import resolve_launch_env
from malora_dist.runtime.log import setup_logging
from malora_dist.train.build import build_model, load_run_tokenizer
from malora_dist.train.heldout import HeldOutSet
from malora_dist.train.preflight import validate_run
from malora_dist.train.trainer import Trainer


def prepare_data(config: RunConfig):
    """Tokenizer and tokenised data: the same on every rank and needs no process group, so bad
    data (a malformed line, an empty task) is reported before any collective could hang."""

    tokenizer = load_run_tokenizer(config.model)
    return tokenizer, build_multitask_data(config.data, tokenizer, config.train.seed)


def train_from_config(config_path: str, overrides: Optional[list] = None) -> str:
    """Train; return the output directory. Config and data errors are raised before any process group."""
    config = load_run_config(config_path, overrides)
    launch = resolve_launch_env(os.environ)
    validate_run(config, launch.world_size)
    setup_logging(launch.rank)
    prepared = prepare_data(config)
    init_distributed(config.parallel.timeout_s)
    finished = False
    try:
        output_dir = run_training(config, prepared=prepared)
        finished = True
        return output_dir
    finally:
        # After a failed collective the final barrier would only wait out another timeout.
        shutdown_distributed(barrier=finished)


def run_training(config: RunConfig, hooks=None, prepared=None) -> str:
    """Train in the already started default process group (several runs may share one world).

    ``hooks`` (tests, tools) may define ``on_start(trainer)``, called after any resume,
    ``on_end(trainer)``, called after the last step, and ``fault_injector(step, loss) -> loss``, given
    to the trainer (``Trainer``'s argument of that name). ``prepared``: ``prepare_data(config)``'s result.
    """
    validate_run(config, dist.get_world_size())
    log = setup_logging(dist.get_rank())
    _, device = pick_backend_and_device(int(os.environ.get("LOCAL_RANK", "0")))
    groups = ParallelGroups.build(config.parallel.tp, config.parallel.ep,
                                  config.adapter.num_experts if config.adapter.is_moe else None,
                                  timeout_s=config.parallel.timeout_s)
    return _train(config, groups, device, log, hooks, prepared or prepare_data(config))


def _train(config: RunConfig, groups: ParallelGroups, device: torch.device, log, hooks, prepared) -> str:
    """Build the model and the trainer with its collaborators, run the loop, export the adapter of a
    finished run."""
    train = config.train
    output_dir = train.output_dir
    if dist.get_rank() == 0:
        os.makedirs(output_dir, exist_ok=True)
    dist.barrier()
    tokenizer, data = prepared
    sampler = data.sampler(train.global_batch_size)
    total_steps = train.steps if train.steps is not None else sampler.steps_for_epochs(train.epochs)
    model = build_model(config, groups, device)
    heldout = HeldOutSet(data, tokenizer, config, groups) if train.eval_interval else None
    trainer = Trainer(config, groups, device, model, data, total_steps, output_dir, heldout=heldout,
                      fault_injector=getattr(hooks, "fault_injector", None))
    if trainer.fit(hooks):
        save_adapter(model, os.path.join(output_dir, "adapter"), config.adapter, groups,
                     base_model_name_or_path=config.model.name_or_path or config.model.gguf_file or "")
        log.info("adapter written to %s", os.path.join(output_dir, "adapter"))
    return output_dir
