"""Bad data at the training entry point, with the tokenizer the trainer loads.

tests/test_data.py already checks, at the pipeline level: a malformed JSON-lines line and a
malformed JSON list (file:line, skipped and counted), a missing field (file:line, skipped), an
empty file, a path that matches no file, an answer that tokenises to nothing (error mode) and
over-long examples truncated or dropped and counted. This file adds what is left: several kinds of
bad record in one file, a task emptied by skipping or by dropping, an answer that tokenises to
nothing under ``bad_records: skip``, and ``launch/train.py`` itself, which must exit with code 2
and the file:line message (no traceback, nothing trained) or, with ``skip``, train and report the
skipped records.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from training_support import REPO, TINY

from malora_dist.config.run import load_run_config
from malora_dist.data import DataConfig, DataError, Example, build_multitask_data, tokenize_examples
from malora_dist.data.records import BadRecords
from malora_dist.data.synthetic import write_synthetic
from malora_dist.train.build import load_run_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_run_tokenizer(load_run_config(TINY).model)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(out), seed=1, train_size=12, test_size=4)
    with open(out / "parity" / "train.json") as f:
        return json.load(f)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def data_config(tasks, **keys):
    return DataConfig.from_dict({"tasks": tasks, "seq_len": 64, **keys})


def test_every_kind_of_bad_record_skipped_and_counted_with_its_line(tok, records, tmp_path):
    good = [json.dumps(r) for r in records[:6]]
    no_answer = dict(records[6])
    del no_answer["answer"]
    lines = [good[0], good[1][:-3], good[2], "[1, 2]", good[3], json.dumps(no_answer), good[4], good[5]]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    data = build_multitask_data(data_config([{"name": "t", "paths": path}], bad_records="skip"), tok, seed=0)
    stats = data.stats["t"]
    assert (stats.skipped, stats.examples) == (3, 5)
    reasons = stats.skip_reasons
    assert len(reasons) == 3
    for line, words in ((2, "invalid JSON"), (4, "must be a JSON object"), (6, "missing field 'answer'")):
        assert any(r.startswith(f"{path}:{line}: ") and words in r for r in reasons), (line, reasons)
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):  # error mode stops at the first
        build_multitask_data(data_config([{"name": "t", "paths": path}]), tok, seed=0)


def test_task_emptied_by_skipping_names_the_first_reason(tok, records, tmp_path):
    ok = write_lines(tmp_path / "ok.jsonl", [json.dumps(r) for r in records[:4]])
    bad = write_lines(tmp_path / "bad.jsonl", ["{not json", json.dumps({"instruction": "x"})])
    tasks = [{"name": "fine", "paths": ok}, {"name": "broken", "paths": bad}]
    with pytest.raises(DataError) as err:
        build_multitask_data(data_config(tasks, bad_records="skip"), tok, seed=0)
    message = str(err.value)
    assert "task 'broken' has no training examples" in message and "skipped 2 as bad" in message
    assert f"{bad}:1: invalid JSON" in message


def test_task_emptied_by_dropping_overlong_examples_says_how_to_fix(tok, records, tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(r) for r in records[:4]])
    with pytest.raises(DataError) as err:
        build_multitask_data(data_config([{"name": "t", "paths": path}], seq_len=8, overlong="drop"), tok, seed=0)
    assert "dropped 4 longer than seq_len 8" in str(err.value) and "data.seq_len" in str(err.value)


def test_empty_jsonl_file_is_an_empty_task(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="task 'e' has no training examples"):
        build_multitask_data(data_config([{"name": "e", "paths": str(path)}]), tok, seed=0)


def test_answer_that_tokenises_to_nothing_is_skipped_and_counted(tok):
    # Unreachable from a record with this byte-level tokenizer (every non-empty text has tokens,
    # and empty answers are rejected as missing fields), so the tokenising step is called directly.
    examples = [Example(0, "Question: a\nAnswer:", " yes", "f.jsonl:1"),
                Example(0, "Question: b\nAnswer:", "", "f.jsonl:2")]
    bad = BadRecords("skip")
    tokenized, _ = tokenize_examples(tok, examples, 64, "truncate", False, bad)
    assert len(tokenized) == 1 and bad.count == 1
    assert bad.reasons == ["f.jsonl:2: the answer '' tokenises to nothing"]


def test_launcher_reports_bad_data_with_file_and_line(records, tmp_path):
    lines = [json.dumps(r) for r in records]
    lines[2] = lines[2][:-5]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    tasks = f"data.tasks=[{{name: t, paths: {path}}}]"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    env.update(OMP_NUM_THREADS="1")
    runs = {mode: str(tmp_path / mode) for mode in ("error", "skip")}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "launch/train.py", "--config", TINY, "--set", tasks, "--set", f"data.bad_records={mode}",
             "--set", f"train.output_dir={out}", "--set", "train.steps=1", "--set", "train.global_batch_size=2"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for mode, out in runs.items()
    }
    results = {mode: (*p.communicate(timeout=300), p.returncode) for mode, p in procs.items()}

    _, stderr, code = results["error"]
    assert code == 2, stderr[-2000:]
    assert f"error: {path}:3: invalid JSON" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not os.path.exists(os.path.join(runs["error"], "metrics.jsonl"))
    assert not os.path.exists(os.path.join(runs["error"], "checkpoints"))

    _, stderr, code = results["skip"]
    assert code == 0, stderr[-2000:]
    assert f"task t: {len(lines) - 1} records, 1 skipped" in stderr and f"skipped {path}:3: invalid JSON" in stderr
    with open(os.path.join(runs["skip"], "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1]
