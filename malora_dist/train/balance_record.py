"""What a checkpoint records about its balance loss, and what a resumed run says about it.

The token set of the balance loss is part of what a run computes, but lives outside the fingerprinted
config sections: it is each micro-batch of ``train.micro_batch_size`` sequences (``gating.balance_loss``).
New checkpoints record that definition and the micro-batch size. Resuming compares them with the run:

- a different ``train.micro_batch_size`` is allowed (train keys are the user's to change on resume,
  as the learning rate is) but warned about: the steps after the resume balance over other slices;
- a checkpoint without the record was written while the balance loss took each round of dp
  micro-batches together (all dp ranks' current micro-batch). Written at dp = 1 that was one
  micro-batch, the same as now: it resumes silently. Written at dp > 1 it resumes with a warning
  that the steps before it balanced over rounds of dp × micro_batch_size sequences.

Nothing is said when the run has no balance loss (LoRA, or ``balance_loss_coef: 0``). The router
z-loss needs no record: a per-token mean over equally sized micro-batches, its value never depended
on how they were grouped.
"""

from __future__ import annotations

from typing import Optional

# The token set of the balance loss: one micro-batch (a fixed slice of the global batch).
DEFINITION = "micro_batch"
KEY = "balance_loss"


def balance_record(config) -> dict:
    """The checkpoint's record of the balance loss's token set."""
    return {"definition": DEFINITION, "micro_batch_size": config.train.micro_batch_size}


def _balance_on(config) -> bool:
    return config.adapter.is_moe and config.adapter.balance_loss_coef > 0


def resume_warning(meta: dict, config, path: str) -> Optional[str]:
    """A warning when the checkpoint's steps took the balance loss over other token sets than this
    run will; None when they agree (or the run has no balance loss)."""
    if not _balance_on(config):
        return None
    mbs = config.train.micro_batch_size
    record = meta.get(KEY)
    if record is None:  # written before the record existed
        dp = meta.get("layout", {}).get("dp", 1)
        if dp == 1:
            return None
        return (f"{path} was written at dp={dp} by a version that took the balance loss over each round of "
                f"{dp} micro-batches ({dp} × micro_batch_size sequences); this run takes it over each "
                f"micro-batch of train.micro_batch_size={mbs} sequences, the same at every layout, so the "
                f"steps after the resume balance over smaller slices than the steps before it")
    if record.get("definition") != DEFINITION or record.get("micro_batch_size") != mbs:
        return (f"{path} took the balance loss over {record.get('definition')} slices of "
                f"{record.get('micro_batch_size')} sequences; this run takes it over micro-batches of "
                f"train.micro_batch_size={mbs} sequences, so the steps after the resume balance over "
                f"other slices than the steps before it")
    return None
