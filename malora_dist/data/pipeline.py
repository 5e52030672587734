"""The whole pipeline: a ``DataConfig`` and a tokenizer → packed training sequences, held-out
examples, per-task counts, and a ``GlobalBatchSampler`` over the mixture."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from malora_dist.config.data import DataConfig, TaskConfig
from malora_dist.data.batches import PackedSequences, pack_examples
from malora_dist.data.mixing import GlobalBatchSampler, mixing_probabilities, seeded_generator, sequence_shares
from malora_dist.data.prompts import Example, record_to_example
from malora_dist.data.records import BadRecords, DataError, Record, read_task_records
from malora_dist.data.tokenize import eos_id, tokenize_examples

log = logging.getLogger(__name__)


@dataclass
class TaskStats:
    """Counts of one task: records read, bad records skipped, training examples kept (after the
    held-out split), over-long ones truncated or dropped, sequences, held-out examples."""

    records: int = 0
    skipped: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    sequences: int = 0
    eval_examples: int = 0
    skip_reasons: list = field(default_factory=list)


@dataclass
class MultiTaskData:
    """The built data of a run.

    task_names: tasks in config order (``task_id`` = index). train: the training sequences.
    eval_examples: held-out examples per task name (with their ``MultipleChoice`` for scoring).
    mixing: the share of training examples per task. stats: ``TaskStats`` per task name.
    """

    config: DataConfig
    task_names: list[str]
    train: PackedSequences
    eval_examples: dict[str, list[Example]]
    mixing: list[float]
    stats: dict[str, TaskStats]
    seed: int

    def sampler(self, global_batch_size: int) -> GlobalBatchSampler:
        sequences, examples = self.train.count_by_task(len(self.task_names))
        shares = sequence_shares(self.mixing, examples, sequences)
        return GlobalBatchSampler(sequences, shares, global_batch_size, self.seed)

    def micro_batches(
        self, sampler: GlobalBatchSampler, step: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of ``step`` as tensors (see ``PackedSequences.batch``)."""
        return [self.train.batch(ids) for ids in sampler.local_micro_batches(step, dp_rank, dp_size, micro_batch_size)]


def build_multitask_data(cfg: DataConfig, tokenizer: Any, seed: int, base_dir: Optional[str] = None) -> MultiTaskData:
    """Read, prompt, tokenise and pack every task of ``cfg``; ``seed`` (the trainer's) drives the
    mixing stream (and the tasks' ``sample`` unless ``cfg.sample_seed`` is set); ``base_dir``
    resolves relative data paths (default: the working directory)."""
    chat_tokenizer = tokenizer if cfg.use_chat_template else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
    train: list = []
    eval_examples, stats = {}, {}
    for task_id, task in enumerate(cfg.tasks):
        bad = BadRecords(cfg.bad_records)
        records, examples, held = _task_examples(cfg, task, task_id, chat_tokenizer, bad, seed, base_dir)
        tokenized, counts = tokenize_examples(
            tokenizer, examples, cfg.seq_len, cfg.overlong, cfg.use_chat_template, bad
        )
        stat = TaskStats(
            records=len(records), skipped=bad.count, examples=len(tokenized), truncated=counts.truncated,
            dropped=counts.dropped, eval_examples=len(held), skip_reasons=bad.reasons,
        )
        if not tokenized and not task.eval_only:
            raise DataError(_empty_task_message(task, stat, cfg.seq_len))
        train.extend(tokenized)
        eval_examples[task.name] = held
        stats[task.name] = stat
    packed = pack_examples(train, len(cfg.tasks), cfg.seq_len, cfg.packing, pad_id)
    sequences, _ = packed.count_by_task(len(cfg.tasks))
    for task, n in zip(cfg.tasks, sequences):
        stats[task.name].sequences = n
    sizes = [stats[t.name].examples for t in cfg.tasks]
    weights = [0.0 if t.eval_only else t.weight for t in cfg.tasks]  # no share of the training stream
    mixing = mixing_probabilities(sizes, weights, cfg.mixing, cfg.temperature)
    for task, p in zip(cfg.tasks, mixing):
        s = stats[task.name]
        log.info(
            "task %s: %d records, %d skipped, %d examples (%d truncated, %d dropped) in %d sequences, "
            "%d held out, mixing share %.3f", task.name, s.records, s.skipped, s.examples, s.truncated,
            s.dropped, s.sequences, s.eval_examples, p,
        )
        for reason in s.skip_reasons:
            log.warning("task %s: skipped %s", task.name, reason)
    return MultiTaskData(cfg, [t.name for t in cfg.tasks], packed, eval_examples, mixing, stats, seed)


def build_eval_examples(cfg: DataConfig, tokenizer: Any, seed: int, base_dir: Optional[str] = None) -> dict:
    """{task name: its held-out examples}, exactly as ``build_multitask_data`` holds them out, but
    without reading the training records of tasks that have their own held-out files or split
    (an evaluation of GSM8K's test set need not read MetaMathQA's 395k training records)."""
    chat_tokenizer = tokenizer if cfg.use_chat_template else None
    held_out = {}
    for task_id, task in enumerate(cfg.tasks):
        bad = BadRecords(cfg.bad_records)
        held_out[task.name] = _task_examples(cfg, task, task_id, chat_tokenizer, bad, seed, base_dir, train=False)[2]
        for reason in bad.reasons:
            log.warning("task %s: skipped %s", task.name, reason)
    return held_out


def _task_examples(cfg: DataConfig, task: TaskConfig, task_id: int, chat_tokenizer: Any, bad: BadRecords, seed: int,
                   base_dir: Optional[str], train: bool = True) -> tuple[list[Record], list[Example], list[Example]]:
    """(training records, training examples, held-out examples) of one task. ``train=False``
    skips the training records where the held-out set does not come from them; an ``eval_only``
    task has none."""
    own_held_out = bool(task.eval_paths or task.eval_split)
    split_off = not own_held_out and cfg.eval_fraction > 0  # the held-out set comes from the training records
    records, examples = [], []
    if not task.eval_only and (train or split_off):
        sample_seed = cfg.sample_seed if cfg.sample_seed is not None else seed
        records = read_task_records(task, held_out=False, bad=bad, base_dir=base_dir, local_dir=cfg.local_dir,
                                    sample_seed=sample_seed)
        examples = _to_examples(records, task, task_id, chat_tokenizer, bad)
    if own_held_out:
        held_records = read_task_records(task, held_out=True, bad=bad, base_dir=base_dir, local_dir=cfg.local_dir)
        return records, examples, _to_examples(held_records, task, task_id, chat_tokenizer, bad)
    examples, held = _split_off(examples, cfg.eval_fraction, task.name)
    return records, examples, held


def _to_examples(records: list[Record], task: TaskConfig, task_id: int, chat_tokenizer: Any,
                 bad: BadRecords) -> list[Example]:
    examples = []
    for record in records:
        try:
            examples.append(record_to_example(record.data, task, task_id, record.where, chat_tokenizer))
        except DataError as err:
            bad.reject(record.where, str(err))
    return examples


def _split_off(examples: list[Example], fraction: float, task_name: str) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of the examples, chosen by the task's name (not the run's seed)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    count = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    order = torch.randperm(len(examples), generator=seeded_generator("eval-split", task_name)).tolist()
    held = set(order[:count])
    return (
        [e for i, e in enumerate(examples) if i not in held],
        [e for i, e in enumerate(examples) if i in held],
    )


def _empty_task_message(task: TaskConfig, stat: TaskStats, seq_len: int) -> str:
    source = task.hub or ", ".join(task.paths)
    message = f"task {task.name!r} has no training examples ({source}): read {stat.records} records"
    if stat.skipped:
        message += f", skipped {stat.skipped} as bad (first: {stat.skip_reasons[0]})"
    if stat.dropped:
        message += (f", dropped {stat.dropped} longer than seq_len {seq_len} "
                    "(raise data.seq_len or use overlong: truncate)")
    if stat.eval_examples:
        message += f", held out {stat.eval_examples}"
    return message + ". Check the task's paths and fields."
