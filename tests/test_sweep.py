"""The sweep command end to end: a 2×2×2 grid of tiny runs, half of it run as array tasks first,
then resumed; the table aggregates the seeds."""

import json
import os
import statistics
import subprocess
import sys

import pytest
from training_support import REPO, TINY

from malora_dist.sweep.runner import expand, parse_grid

GRID = ["adapter.method=lora,malora", "adapter.rank=2,4", "train.seed=0,1"]


def test_grid_expands_in_order():
    points = expand(parse_grid(["adapter.rank=2,4", "train.seed=0,1"]))
    assert [p["name"] for p in points] == ["rank-2_seed-0", "rank-2_seed-1", "rank-4_seed-0", "rank-4_seed-1"]
    with pytest.raises(ValueError, match="section.key=value1,value2"):
        parse_grid(["rank=2"])


def test_linked_keys_vary_together():
    """A baseline at its own rank: three points for three methods, not nine."""
    points = expand(parse_grid(["adapter.method/adapter.rank=lora/32,molora/8,malora/8", "train.seed=0,1"]))
    assert [p["values"] for p in points[::2]] == [
        {"adapter.method": m, "adapter.rank": r, "train.seed": 0}
        for m, r in (("lora", 32), ("molora", 8), ("malora", 8))]
    assert points[1]["name"] == "method-lora_rank-32_seed-1"
    with pytest.raises(ValueError, match="must give 2 parts"):
        parse_grid(["adapter.method/adapter.rank=lora/32,molora"])
    with pytest.raises(ValueError, match="twice"):
        parse_grid(["adapter.method/adapter.rank=lora/32", "adapter.rank=8"])


def test_table_reads_reports_from_before_the_metric_key(tmp_path):
    """A sweep resumed across versions: an older point's eval.json has accuracy and no score."""
    from malora_dist.sweep.runner import aggregate

    spec = {"config": TINY, "grid": {"train.seed": [0, 1]}, "points": expand(parse_grid(["train.seed=0,1"]))}
    for point, report in zip(spec["points"], ({"accuracy": 0.5}, {"accuracy": 0.75, "score": 0.75})):
        os.makedirs(tmp_path / "points" / point["name"])
        json.dump({"tasks": {"boolq": report}}, open(tmp_path / "points" / point["name"] / "eval.json", "w"))
    cell = aggregate(spec, str(tmp_path))["rows"][0]["tasks"]["boolq"]
    assert cell["mean"] == pytest.approx(0.625) and cell["n"] == 2


def sweep(*args):
    return subprocess.run([sys.executable, "-m", "malora_dist.commands.sweep", *args], cwd=REPO, capture_output=True,
                          text=True)


@pytest.mark.slow
def test_sweep_runs_resumes_and_aggregates(tmp_path):
    out = str(tmp_path / "sweep")
    start = ["--config", TINY, *[a for g in GRID for a in ("--grid", g)],
             "--set", "train.steps=2", "--set", "data.eval_fraction=0.1", "--eval-limit", "4"]
    # Half of it as SLURM array tasks would run it, then the whole sweep resumes.
    for index in (0, 3, 5):
        done = sweep("run-index", str(index), "--out", out, *start)
        assert done.returncode == 0, done.stderr[-3000:]
    spec = json.load(open(os.path.join(out, "sweep.json")))
    first = {p["name"]: os.path.getmtime(os.path.join(out, "points", p["name"], "eval.json"))
             for p in spec["points"] if p["index"] in (0, 3, 5)}
    resumed = sweep("run", "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, mtime in first.items():  # finished points are not run again
        assert os.path.getmtime(os.path.join(out, "points", name, "eval.json")) == mtime
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["done"] == results["points"] == 8 and len(results["rows"]) == 4
    for row in results["rows"]:
        assert sorted(row["seeds"]) == [0, 1]
        name = lambda seed: "_".join([f"method-{row['values']['adapter.method']}",  # noqa: E731
                                      f"rank-{row['values']['adapter.rank']}", f"seed-{seed}"])
        for task, cell in row["tasks"].items():
            if task == "mean":
                continue
            seeds = [json.load(open(os.path.join(out, "points", name(s), "eval.json")))["tasks"][task]["accuracy"]
                     for s in (0, 1)]
            assert cell["mean"] == pytest.approx(statistics.fmean(seeds))
            assert cell["sd"] == pytest.approx(statistics.stdev(seeds))
    assert "± " in open(os.path.join(out, "results.md")).read()
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000  # matplotlib is in the [test] extra
    clash = sweep("run", "--out", out, "--config", TINY, "--grid", "adapter.rank=8")
    assert clash.returncode == 2 and "another grid" in clash.stderr


@pytest.mark.slow
def test_sweep_with_a_launcher_and_an_array_task(tmp_path):
    """Points launched by torchrun on 2 processes (ep=2); point 1 run by the SLURM array template as
    sbatch runs it (a copy elsewhere, the job's variables set), point 0 by resuming the sweep."""
    out = str(tmp_path / "sweep")
    launcher = f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --standalone"
    created = sweep("run-index", "0", "--out", out, "--config", TINY, "--grid", "train.seed=0,1",
                    "--set", "parallel.ep=2", "--set", "train.steps=2", "--set", "data.eval_fraction=0.1",
                    "--eval-limit", "4", "--launcher", launcher)
    assert created.returncode == 0, created.stderr[-3000:]
    spool = tmp_path / "spool"
    spool.mkdir()
    script = spool / "slurm_script"
    script.write_text(open(os.path.join(REPO, "launch", "slurm", "sweep_array.sbatch")).read())
    env = dict(os.environ, SLURM_SUBMIT_DIR=REPO, SLURM_ARRAY_TASK_ID="1", PYTHON=sys.executable)
    task = subprocess.run(["bash", str(script), out], cwd=str(spool), env=env, capture_output=True, text=True)
    assert task.returncode == 0, task.stderr[-3000:]
    assert os.path.exists(os.path.join(out, "points", "seed-1", "eval.json"))
    table = sweep("table", "--out", out)
    assert table.returncode == 0 and json.load(open(os.path.join(out, "results.json")))["done"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "points", "seed-0", "run", "metrics.jsonl"))]
    assert any(r.get("a2a_bytes", 0) > 0 for r in rows)  # the experts really were split over 2 ranks


@pytest.mark.slow
def test_train_only_then_evaluated_with_wider_batches(tmp_path):
    """--train-only writes the adapter and scores nothing; the same sweep run again scores it, with
    the spec's --rows-per-batch (the same scores as the default batches)."""
    out = str(tmp_path / "sweep")
    trained = sweep("run", "--out", out, "--config", TINY, "--grid", "train.seed=0", "--set", "train.steps=1",
                    "--set", "data.eval_fraction=0.1", "--eval-limit", "4", "--rows-per-batch", "16", "--train-only")
    assert trained.returncode == 0, trained.stderr[-3000:]
    point = os.path.join(out, "points", "seed-0")
    assert os.path.isdir(os.path.join(point, "run", "adapter")) and not os.path.exists(os.path.join(point, "eval.json"))
    assert json.load(open(os.path.join(out, "results.json")))["done"] == 0
    assert json.load(open(os.path.join(out, "sweep.json")))["rows_per_batch"] == 16
    scored = sweep("run", "--out", out)
    assert scored.returncode == 0, scored.stderr[-3000:]
    wide = json.load(open(os.path.join(point, "eval.json")))["tasks"]
    narrow = subprocess.run([sys.executable, "launch/evaluate.py",
                             "--config", os.path.join(point, "run", "config.yaml"),
                             "--adapter", os.path.join(point, "run", "adapter"), "--limit", "4",
                             "--output", str(tmp_path / "narrow.json")], cwd=REPO, capture_output=True, text=True)
    assert narrow.returncode == 0, narrow.stderr[-3000:]
    narrow = json.load(open(tmp_path / "narrow.json"))["tasks"]
    assert {t: e["accuracy"] for t, e in wide.items()} == {t: e["accuracy"] for t, e in narrow.items()}
