"""Answer prompts in the launched world: one process decodes with a plain Hugging Face model (the
adapter injected); a tensor- or expert-parallel world decodes with the run's model in its layout,
the prompts split over dp, every rank in step."""

from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from malora_dist.data import encode_prompts
from malora_dist.data.prompts import wrap_chat
from malora_dist.data.tokenize import eos_id
from malora_dist.inference.decoding import hf_generate, tp_generate
from malora_dist.inference.model import build_eval_model
from malora_dist.parallel.adapter_files import load_adapter, read_adapter_config
from malora_dist.runtime.distributed import pick_backend_and_device
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.train.build import load_hf_base, load_run_tokenizer


def share_from_rank0(obj):
    box = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def generate_all(config, adapter_dir: Optional[str], prompts: list[str], chat: bool, sampling) -> Optional[list]:
    """[{prompt, text, token_ids}] on rank 0 (None elsewhere), in the default process group."""
    tokenizer = load_run_tokenizer(config.model)
    eos = eos_id(tokenizer)
    ids = encode_prompts(tokenizer, [wrap_chat(p, tokenizer if chat else None) for p in prompts], chat)
    _, device = pick_backend_and_device(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.get_world_size() == 1 and config.parallel.tp == 1:
        model = load_hf_base(config.model, config.train.seed)
        if adapter_dir is not None:
            load_adapter(model, adapter_dir)
        model = model.to(device).eval()
        answers = {i: hf_generate(model, p, sampling, eos, device) for i, p in enumerate(ids)}
        gathered = [answers]
    else:
        adapter = read_adapter_config(adapter_dir) if adapter_dir is not None else None
        groups = ParallelGroups.build(config.parallel.tp, config.parallel.ep,
                                      adapter.num_experts if adapter is not None and adapter.is_moe else None)
        model = build_eval_model(config, groups, device, adapter_dir)
        mine = list(range(groups.dp_rank, len(ids), groups.dp))
        rounds = -(-len(ids) // groups.dp)
        answers = {}
        for r in range(rounds):
            i = mine[r] if r < len(mine) else None
            tokens = tp_generate(model, ids[i] if i is not None else None, sampling, eos, groups, device)
            if i is not None:
                answers[i] = tokens
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(answers, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {i: tokens for part in gathered for i, tokens in part.items()}
    return [{"prompt": p, "text": tokenizer.decode(merged[i], skip_special_tokens=True).strip(),
             "token_ids": merged[i]} for i, p in enumerate(prompts)]
