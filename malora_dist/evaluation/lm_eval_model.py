"""lm-evaluation-harness (``pip install "malora_dist[eval]"``) for malora_dist adapters: the model type
``malora``, registered with lm-eval's model registry.

    malora-lm-eval --model malora --model_args config=CONFIG,adapter=DIR --tasks arc_easy [lm-eval flags ...]
    python -m malora_dist.commands.lm_eval ...                               (the same)
    torchrun --nproc_per_node 2 -m malora_dist.commands.lm_eval --model malora ...   (data parallel)

lm-eval has no plugin hook for model types, so this command imports the registration and then runs
lm-eval's own command line (every lm-eval flag and task works); ``import malora_dist.evaluation.lm_eval_model``
does the same for ``lm_eval.simple_evaluate(model="malora", ...)``.

``config`` is a run config (its ``model:`` section names the base, as in training); ``adapter`` a
saved adapter directory (LoRA, MoLoRA or MALoRA; omit it for the base model); ``set`` overrides
config keys (``set=model.dtype=float32``; several separated by ``;``). The model is the plain Hugging
Face base with the adapter injected (all experts local, KV cache for generation), driven by lm-eval's
own ``HFLM``: log-likelihood, rolling log-likelihood and ``generate_until`` requests. Under torchrun
every rank holds the whole model and lm-eval splits the requests over the ranks (its distributed
hooks ``all_gather`` / ``gather_object`` / ``barrier``, here on ``torch.distributed``).
"""

from __future__ import annotations

import copy
import os
from typing import Optional

import torch
import torch.distributed as dist
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from malora_dist.config.run import load_run_config
from malora_dist.parallel.adapter_files import load_adapter
from malora_dist.runtime.distributed import init_distributed, pick_backend_and_device
from malora_dist.train.build import load_hf_base, load_run_tokenizer

MODEL_TYPE = "malora"


@register_model(MODEL_TYPE)
class MaloraLM(HFLM):
    def __init__(self, config: str, adapter: Optional[str] = None, set: Optional[str] = None, **kwargs):  # noqa: A002

        if "pretrained" in kwargs or "peft" in kwargs:
            raise ValueError("--model malora takes config=RUN_CONFIG and adapter=DIR, not pretrained=/peft=: "
                             "the base comes from the config's model: section")
        if adapter is not None and not os.path.isdir(adapter):
            raise ValueError(f"adapter={adapter!r} (--model_args) is not a directory")
        run_config = load_run_config(config, [s for s in (set or "").split(";") if s])
        model = load_hf_base(run_config.model, run_config.train.seed)
        if adapter is not None:
            load_adapter(model, adapter)
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        device = init_distributed(run_config.parallel.timeout_s) if distributed else \
            pick_backend_and_device(int(os.environ.get("LOCAL_RANK", "0")))[1]
        # lm-eval sets a pad token on the tokenizer: a copy keeps the run's cached one as it is.
        tokenizer = copy.deepcopy(load_run_tokenizer(run_config.model))
        kwargs.pop("device", None)  # the model is placed here, by malora_dist.runtime.distributed's choice
        super().__init__(pretrained=model.to(device).eval(), tokenizer=tokenizer, **kwargs)
        if distributed:  # HFLM takes a model object for one process; the request split is lm-eval's
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 (a 0-d tensor counts as one element)."""
        if self.world_size <= 1:
            return tensor
        tensor = tensor.reshape(-1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
