"""Which examples an evaluation scores: the run config's held-out sets, or ``--task`` files.

Both go through ``data.pipeline.build_eval_examples``, so the evaluated examples are exactly the
held-out examples training sees (``eval_paths`` / ``eval_split`` / the ``eval_fraction`` split), with the
same prompts, styles, chat template and bad-record policy. A ``--task NAME=PATH[:style|:format]``
becomes a task whose held-out set is PATH (``synthetic:<task>`` reads the synthetic task's test split).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from malora_dist.config.data import STYLES
from malora_dist.data import DataConfig, Example, TaskConfig
from malora_dist.data.formats import FORMATS
from malora_dist.data.pipeline import build_eval_examples
from malora_dist.data.records import names_records
from malora_dist.runtime.log import get_logger


@dataclass
class EvalTask:
    """name: the task's name in the report; style: ``text`` | ``label`` | ``generation``;
    metric: how it is scored (``data.tasks[].metric``); examples: the scored examples (their
    ``mc`` for multiple choice, their ``reference`` for the free-form metrics), in file order."""

    name: str
    style: str
    metric: str
    examples: list[Example]


def parse_task_spec(spec: str) -> TaskConfig:
    """``NAME=PATH[:style|:format]`` → a task whose held-out set is PATH; errors name ``--task``.

    A suffix after the last ``:`` is a style or a format (``data.tasks[].format``, which implies its
    style and metric) only if it is one (``synthetic:capitals`` is a path).
    """
    name, sep, rest = spec.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"--task {spec!r} must look like NAME=PATH, NAME=PATH:STYLE (STYLE: {', '.join(STYLES)}) "
                         f"or NAME=PATH:FORMAT (FORMAT: {', '.join(FORMATS)})")
    path, keys = rest, {}
    head, colon, tail = rest.rpartition(":")
    if colon and tail in STYLES:
        path, keys = head, {"style": tail}
    elif colon and tail in FORMATS:
        path, keys = head, {"format": tail}
    elif colon and names_records(head) and not names_records(rest):
        raise ValueError(f"--task {spec!r}: {tail!r} after the last ':' is neither a style ({', '.join(STYLES)}) "
                         f"nor a format ({', '.join(FORMATS)})")
    if not path:
        raise ValueError(f"--task {spec!r} names no file before :{tail}")
    try:
        return TaskConfig(name=name.strip(), paths=[path], eval_paths=[path], **keys)
    except ValueError as err:
        raise ValueError(f"--task {spec!r}: {err}") from None


def task_configs_from_specs(specs: list[str]) -> list[TaskConfig]:
    tasks = [parse_task_spec(spec) for spec in specs]
    for i, (spec, task) in enumerate(zip(specs, tasks)):
        if any(t.name == task.name for t in tasks[:i]):
            raise ValueError(f"--task {spec!r}: the name {task.name!r} is given twice: task names must be unique")
    return tasks


def load_eval_tasks(data: DataConfig, tokenizer: Any, seed: int, task_configs: Optional[list[TaskConfig]] = None,
                    limit: Optional[int] = None, base_dir: Optional[str] = None) -> list[EvalTask]:
    """The held-out examples of ``task_configs`` (default: ``data.tasks``), the first ``limit`` of each.

    ``--task`` files are read with the run's data settings (seq_len, chat template, bad records).
    """
    from_specs = task_configs is not None
    if from_specs:
        # Their eval_paths make eval_fraction meaningless, and as files they neither read local_dir
        # nor sample (DataConfig rejects keys without effect).
        data = dataclasses.replace(data, tasks=task_configs, eval_fraction=0.0, local_dir=None, sample_seed=None)
    try:
        held_out = build_eval_examples(data, tokenizer, seed, base_dir)
    except ValueError as err:
        raise ValueError(f"--task: {err}" if from_specs else str(err)) from None
    tasks = []
    for task in data.tasks:
        examples = held_out[task.name]
        if not examples and _training_only(task, data) and not from_specs:
            # a suite's training-only dataset (the paper's MetaMathQA): its skills are scored on
            # other, eval_only tasks
            get_logger().info("task %s has no held-out set (no eval_paths, eval_split or "
                              "data.eval_fraction): not scored", task.name)
            continue
        if not examples:
            raise ValueError(
                f"task {task.name!r} has no held-out examples: give it eval_paths (or eval_split), set "
                f"data.eval_fraction, or pass --task {task.name}=PATH"
            )
        tasks.append(EvalTask(task.name, task.style, task.metric, examples[:limit] if limit is not None else examples))
    if not tasks:
        raise ValueError("no task has a held-out set: give tasks eval_paths (or eval_split), set "
                         "data.eval_fraction, or pass --task NAME=PATH")
    return tasks


def _training_only(task: TaskConfig, data: DataConfig) -> bool:
    return not (task.eval_paths or task.eval_split or data.eval_fraction > 0)
