"""The GPU reproduction kit on this CPU: its parts gathered over several calls, its config pointed at
the carried files, and the whole study in miniature (the same script, ``--scale tiny``)."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import yaml
from training_support import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks", "reproduction"))
import gpu_kit  # noqa: E402


def _payload(path, text):
    with tarfile.open(path, "w:gz") as tar:
        data = text.encode()
        info = tarfile.TarInfo("model.gguf")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _call(tmp_path, manifest, part, name):
    """The tree one call carries: the manifest and one part."""
    kit = tmp_path / name
    kit.mkdir()
    (kit / gpu_kit.MANIFEST).write_text(json.dumps(manifest))
    (kit / f"part-{part}").write_bytes((tmp_path / "pack" / f"part-{part}").read_bytes())
    return str(kit)


def test_parts_are_gathered_over_calls_and_checked(tmp_path):
    (tmp_path / "pack").mkdir()
    archive = str(tmp_path / "payload.tar.gz")
    _payload(archive, "weights " * 5000)
    manifest = gpu_kit.split(archive, str(tmp_path / "pack"), 3)
    assert manifest["parts"] == 3 and sum(manifest["part_bytes"]) == os.path.getsize(archive)
    into = str(tmp_path / "machine")
    assert not gpu_kit.receive(_call(tmp_path, manifest, 2, "call0"), into)
    assert not gpu_kit.receive(_call(tmp_path, manifest, 0, "call1"), into)
    assert gpu_kit.receive(_call(tmp_path, manifest, 1, "call2"), into)
    assert (tmp_path / "machine" / "payload" / "model.gguf").read_text() == "weights " * 5000
    assert gpu_kit.receive(_call(tmp_path, manifest, 1, "call3"), into)  # already there: nothing to do

    # a part of another pack (packed again in between) is caught by the checksum
    mixed = str(tmp_path / "mixed")
    assert not gpu_kit.receive(_call(tmp_path, manifest, 0, "m0"), mixed)
    assert not gpu_kit.receive(_call(tmp_path, manifest, 1, "m1"), mixed)
    _payload(archive, "other " * 5000)
    gpu_kit.split(archive, str(tmp_path / "pack"), 3)
    with pytest.raises(ValueError, match="sha256"):
        gpu_kit.receive(_call(tmp_path, manifest, 2, "m2"), mixed)


def test_the_study_reads_the_carried_files(tmp_path):
    path = gpu_kit.study_config(gpu_kit.STUDY_CONFIG, str(tmp_path), str(tmp_path / "data"), "/x/model.gguf")
    config = yaml.safe_load(open(path))
    assert config["model"]["gguf_file"] == "/x/model.gguf"
    files = [t[k] for t in config["data"]["tasks"] for k in ("paths", "eval_paths") if k in t]
    assert len(files) == 9 and all(f.startswith(str(tmp_path / "data") + "/") for f in files)
    assert config["train"]["steps"] == 80  # the study's scale is set per point, by the sweep


@pytest.mark.slow
def test_the_miniature_study(tmp_path):
    """``--scale tiny``: the GPU study's steps end to end on the tiny random model and the synthetic
    tasks: three methods trained and scored, the base model, the table, the analysis with --delta."""
    out = tmp_path / "study"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "reproduction", "gpu_kit.py"), "study",
                           "--scale", "tiny", "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.load(open(out / "sweep" / "results.json"))
    assert results["done"] == results["points"] == 3
    assert sorted(r["values"]["adapter.method"] for r in results["rows"]) == ["lora", "malora", "molora"]
    assert json.load(open(out / "base_model_eval.json"))["tasks"]
    summary = json.load(open(out / "analysis" / "summary.json"))["runs"]
    assert set(summary) == {"molora_s0", "malora_s0"}
    for run in summary.values():
        assert run["delta"]["max_abs_change"] > 0 and run["routing"]["mean_load"]
    for name in ("results.md", "results.png"):
        assert os.path.getsize(out / "sweep" / name) > 100
    for name in ("tables.md", "cca_summary.png", "cca_summary_delta.png", "spectra_delta.png", "routing.png"):
        assert os.path.getsize(out / "analysis" / name) > 100
    timings = json.load(open(out / "kit_timings.json"))
    assert timings["failed"] == [] and set(timings["stages"]) == {"spec", "points", "table", "analysis"}
