"""Held-out loss during training: the mean answer-token loss on a fixed set of held-out sequences."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from malora_dist.data.batches import pack_examples
from malora_dist.data.records import BadRecords
from malora_dist.data.tokenize import eos_id, tokenize_examples


class HeldOutSet:
    """The first ``eval_batches × micro_batch_size × dp`` held-out sequences, split across dp ranks
    like a training batch, so the evaluated set does not depend on the layout."""

    def __init__(self, data, tokenizer, config, groups):
        cfg = data.config
        examples = [e for name in data.task_names for e in data.eval_examples.get(name, [])]
        self.sequences = None
        if not examples:
            return
        tokenized, _ = tokenize_examples(tokenizer, examples, cfg.seq_len, cfg.overlong, cfg.use_chat_template,
                                         BadRecords("skip"))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
        self.sequences = pack_examples(tokenized, len(data.task_names), cfg.seq_len, cfg.packing, pad)
        train = config.train
        per_rank = train.eval_batches * train.micro_batch_size
        total = min(len(self.sequences), per_rank * groups.dp)
        ids = list(range(total))
        share = len(ids) // groups.dp
        mine = ids[groups.dp_rank * share:(groups.dp_rank + 1) * share]
        self.batches = [mine[i:i + train.micro_batch_size] for i in range(0, len(mine), train.micro_batch_size)]

    @torch.no_grad()
    def loss(self, model, groups, device, token_mask) -> float:
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for ids in self.batches:
            batch = {k: v.to(device) for k, v in self.sequences.batch(ids).items()}
            logits = model(batch["input_ids"], batch["position_ids"])
            losses = model.token_losses(logits, batch["labels"])
            mask = token_mask(batch["labels"])
            sums += torch.stack([losses[mask].double().sum(), mask.sum().double()])
        if groups.dp_group is not None:
            dist.all_reduce(sums, group=groups.dp_group)
        return (sums[0] / sums[1].clamp(min=1)).item()


def record_best(output_dir: str, step: int, eval_loss: float) -> bool:
    """Keep ``best.json`` at the step with the lowest held-out loss; return whether this one is best."""
    path = os.path.join(output_dir, "best.json")
    if os.path.exists(path):
        with open(path) as f:
            best = json.load(f)
        if best["eval_loss"] <= eval_loss:
            return False
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "eval_loss": eval_loss}, f)
    os.replace(tmp, path)
    return True
