"""The five-task commonsense study at a scale this CPU cannot run: one GPU, all three methods, 5 seeds,
800 steps (10× the CPU study's), every held-out example; the same table, plots and analyses
(``--delta`` and routing included) as the CPU study of ``commonsense5_smollm2.yaml``.

    python benchmarks/reproduction/gpu_kit.py pack          # here: .kit/ (model, data, packages in parts)
    # there, one call per part, back to back (a machine stays warm 30 s between calls):
    python3 benchmarks/reproduction/gpu_kit.py receive      # carry .kit/manifest.json and .kit/part-0
    bash benchmarks/reproduction/gpu_kit.sh                 # carry .kit/manifest.json and .kit/part-1: runs it
    python benchmarks/reproduction/gpu_kit.py study --scale tiny --out DIR   # the miniature, on this CPU

Why parts: a call takes at most 64 MiB of working tree, and what the offline GPU machine lacks is
more than that: SmolLM2-135M-Instruct's GGUF (98 MB, incompressible: 4- and 8-bit blocks), the
five tasks' files, and the packages of this repo's versions (transformers, huggingface_hub, gguf,
regex as wheels; megatron-core as this environment's pure-Python package, since no wheel of its
version exists for the machine's Python 3.12 in the index here). ``pack`` writes them as one
archive cut into as many parts as the calls need; ``receive`` gathers them on the machine and,
once all are there, checks the archive's sha256 and unpacks it.

``study`` runs the sweep as the CPU study does, at the scale's size: the sweep's spec first (every
point's config checked), then the points on ``workers`` processes at once (each trains with
``sweep run-index --train-only`` and scores its held-out sets with ``launch/evaluate.py``), the
base model's scores beside them, the sweep's table, and ``malora_dist.analysis.experts --delta`` of the
mixtures. On a GPU the points are launch-bound (tens of thousands of small kernels per step, not
FLOPs), so running them side by side is what fills the device. ``kit_timings.json`` records each
stage's wall time and each point's, the measurement the next estimate starts from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
STUDY_CONFIG = os.path.join(HERE, "commonsense5_smollm2.yaml")
TINY_CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
KIT = os.path.join(REPO, ".kit")
MANIFEST = "manifest.json"
RECEIVED = "/tmp/gpu_kit"  # on the machine: the parts, then the unpacked payload
CALL_LIMIT = 64 * 2**20  # what one call carries, working tree included
MARGIN = 2 * 2**20
# where the CPU study's config reads the tasks' files (this project's offline copies)
DATA_PREFIX = "../shared/data/commonsense"
# packages the GPU machine lacks at this repo's versions, carried as wheels for its Python 3.12
WHEELS = ("transformers", "huggingface_hub", "gguf", "regex")
GRID = ["adapter.method/adapter.rank=lora/32,molora/8,malora/8"]

# The study's size. gpu: the scale; tiny: the same steps end to end on a random tiny model
# and the synthetic tasks, in seconds on one CPU core (the test suite runs it).
SCALES = {
    "gpu": {"config": STUDY_CONFIG, "seeds": 5, "steps": 800, "eval_limit": None, "workers": 16,
            "routing_examples": 100, "rows_per_batch": 64, "analysis_jobs": 10, "sets": []},
    "tiny": {"config": TINY_CONFIG, "seeds": 1, "steps": 2, "eval_limit": 3, "workers": 2,
             "routing_examples": 2, "rows_per_batch": 4, "analysis_jobs": 1,
             "sets": ["data.eval_fraction=0.2", "train.global_batch_size=4", "train.micro_batch_size=2",
                      "checkpoint.interval=1000"]},
}


# ---- here: the payload ---------------------------------------------------------------------------

def travelling_bytes() -> int:
    """Bytes of the working tree a call sends: tracked and untracked-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(REPO, n)) for n in names if n and os.path.isfile(os.path.join(REPO, n)))


def _exclude_kit() -> None:
    """.kit/ is ignored by git (it travels only when a call carries it)."""
    path = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    path = os.path.join(REPO, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = open(path).read().split("\n") if os.path.exists(path) else []
    if "/.kit/" not in lines:
        with open(path, "a") as f:
            f.write("/.kit/\n")


def _download_wheels(directory: str) -> list[str]:
    """This environment's versions of ``WHEELS``, for CPython 3.12 on x86-64 (the machine's)."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", directory, *pins],
                   check=True)
    return sorted(os.listdir(directory))


def pack(data_dir: str, parts: int = 0) -> dict:
    """Write .kit/part-K and .kit/manifest.json: model, data and packages, cut to fit the calls."""
    import megatron.core

    from malora_dist.models import smollm2_gguf_path

    _exclude_kit()
    shutil.rmtree(KIT, ignore_errors=True)
    staging = os.path.join(KIT, "staging")
    os.makedirs(os.path.join(staging, "wheels"))
    wheels = _download_wheels(os.path.join(staging, "wheels"))
    archive = os.path.join(KIT, "payload.tar.gz")
    site = os.path.dirname(os.path.dirname(os.path.dirname(megatron.core.__file__)))
    skip = lambda info: None if "__pycache__" in info.name or info.name.endswith(".so") else info  # noqa: E731
    with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
        tar.add(smollm2_gguf_path(), "model.gguf")
        tar.add(data_dir, "data/commonsense")
        tar.add(os.path.join(staging, "wheels"), "wheels")
        # megatron-core, pure Python apart from a datasets helper this project never loads (.so skipped)
        tar.add(os.path.join(site, "megatron"), "site/megatron", filter=skip)
        for name in os.listdir(site):
            if name.startswith("megatron_core-") and name.endswith(".dist-info"):
                tar.add(os.path.join(site, name), f"site/{name}")
    shutil.rmtree(staging)
    room = CALL_LIMIT - travelling_bytes() - MARGIN
    manifest = split(archive, KIT, max(parts, -(-os.path.getsize(archive) // room)))
    manifest["wheels"] = wheels
    with open(os.path.join(KIT, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    os.remove(archive)
    return manifest


def split(archive: str, kit: str, count: int) -> dict:
    """Cut ``archive`` into ``kit/part-0 … part-(count-1)``; write and return the manifest."""
    size = os.path.getsize(archive)
    step = -(-size // count)
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for k in range(count):
            chunk = f.read(step)
            digest.update(chunk)
            with open(os.path.join(kit, f"part-{k}"), "wb") as out:
                out.write(chunk)
    manifest = {"parts": count, "bytes": size, "sha256": digest.hexdigest(),
                "part_bytes": [os.path.getsize(os.path.join(kit, f"part-{k}")) for k in range(count)]}
    with open(os.path.join(kit, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


# ---- there: gather the parts ---------------------------------------------------------------------

def receive(kit: str = KIT, into: str = RECEIVED) -> bool:
    """Keep the parts this call carried; once all are there, check and unpack. True when unpacked."""
    with open(os.path.join(kit, MANIFEST)) as f:
        manifest = json.load(f)
    payload = os.path.join(into, "payload")
    if os.path.exists(os.path.join(payload, "done")):
        return True
    parts_dir = os.path.join(into, "parts")
    os.makedirs(parts_dir, exist_ok=True)
    for k in range(manifest["parts"]):
        name = f"part-{k}"
        if os.path.exists(os.path.join(kit, name)) and not os.path.exists(os.path.join(parts_dir, name)):
            shutil.copy(os.path.join(kit, name), os.path.join(parts_dir, name + ".tmp"))
            os.replace(os.path.join(parts_dir, name + ".tmp"), os.path.join(parts_dir, name))
    have = [k for k in range(manifest["parts"]) if os.path.exists(os.path.join(parts_dir, f"part-{k}"))]
    print(f"gpu_kit: parts {have} of {manifest['parts']} received in {parts_dir}")
    if len(have) < manifest["parts"]:
        return False
    archive = os.path.join(into, "payload.tar.gz")
    digest = hashlib.sha256()
    with open(archive, "wb") as out:
        for k in range(manifest["parts"]):
            with open(os.path.join(parts_dir, f"part-{k}"), "rb") as f:
                chunk = f.read()
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != manifest["sha256"]:
        raise ValueError(f"the joined parts' sha256 {digest.hexdigest()} is not the manifest's {manifest['sha256']}: "
                         f"parts of two different packs? run pack again and send every part")
    shutil.rmtree(payload, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(payload)
    os.remove(archive)
    shutil.rmtree(parts_dir)
    open(os.path.join(payload, "done"), "w").close()
    print(f"gpu_kit: payload unpacked in {payload}: {sorted(os.listdir(payload))}")
    return True


# ---- the study -----------------------------------------------------------------------------------

def study_config(base: str, out: str, data_dir: str | None, model: str | None) -> str:
    """The base config with the tasks' files under ``data_dir`` and the GGUF at ``model``, as OUT/config.yaml."""
    with open(base) as f:
        config = yaml.safe_load(f)
    if data_dir is not None:
        for task in config["data"]["tasks"]:
            for key in ("paths", "eval_paths"):
                if isinstance(task.get(key), str) and task[key].startswith(DATA_PREFIX):
                    task[key] = os.path.abspath(data_dir) + task[key][len(DATA_PREFIX):]
    if model is not None:
        config["model"]["gguf_file"] = os.path.abspath(model)
    path = os.path.join(out, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return path


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


class Jobs:
    """Commands run ``workers`` at a time, each with its log, its wall time kept."""

    def __init__(self, workers: int, env: dict, logs: str):
        self.workers, self.env, self.logs = workers, env, logs
        self.times: dict = {}
        self.failed: list = []

    def run(self, jobs: list[tuple[str, list]], deadline: float) -> None:
        pending, running = list(jobs), {}
        while pending or running:
            while pending and len(running) < self.workers:
                name, commands = pending.pop(0)
                log = open(os.path.join(self.logs, f"{name}.log"), "w")
                script = " && ".join(shlex.join(c) for c in commands)
                running[name] = (subprocess.Popen(script, shell=True, cwd=REPO, env=self.env, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True), log, time.time())
            time.sleep(0.5)
            for name, (proc, log, start) in list(running.items()):
                if proc.poll() is None and time.time() < deadline:
                    continue
                if proc.poll() is None:  # past the deadline: the point's whole process group ends
                    os.killpg(proc.pid, 15)
                    proc.wait()
                log.close()
                self.times[name] = round(time.time() - start, 1)
                if proc.returncode != 0:
                    self.failed.append(name)
                    print(f"gpu_kit: {name} failed (rc {proc.returncode}); its log: {log.name}", flush=True)
                del running[name]


def study(scale: str, out: str, data_dir: str | None = None, model: str | None = None, budget_s: float = 1e9,
          sets: list | None = None) -> dict:
    size = SCALES[scale]
    start = time.time()
    deadline = start + budget_s
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    config = study_config(size["config"], out, data_dir, model)
    sweep_dir = os.path.join(out, "sweep")
    seeds = ",".join(str(s) for s in range(size["seeds"]))
    overrides = [f"train.steps={size['steps']}", *size["sets"], *(sets or [])]
    set_args = [a for o in overrides for a in ("--set", o)]
    spec = [a for g in GRID + [f"train.seed={seeds}"] for a in ("--grid", g)] + set_args
    spec += ["--rows-per-batch", str(size["rows_per_batch"])]
    spec += ["--eval-limit", str(size["eval_limit"])] if size["eval_limit"] else []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    timings = {"scale": scale, "stages": {}}

    def stage(name, fn):
        t0 = time.time()
        fn()
        timings["stages"][name] = round(time.time() - t0, 1)
        print(f"gpu_kit: {name} in {timings['stages'][name]} s (t={time.time() - start:.0f} s)", flush=True)

    # the spec (every point's config checked) before any point starts
    stage("spec", lambda: subprocess.run(_python("-m", "malora_dist.commands.sweep", "table", "--out", sweep_dir,
                                                 "--config", config, *spec), cwd=REPO, env=env, check=True,
                                         stdout=subprocess.DEVNULL))
    with open(os.path.join(sweep_dir, "sweep.json")) as f:
        points = json.load(f)["points"]
    jobs = Jobs(size["workers"], env, os.path.join(out, "logs"))
    limit = ["--limit", str(size["eval_limit"])] if size["eval_limit"] else []
    # each point trains and scores its held-out sets in one process (sweep run-index)
    work = [(p["name"], [_python("-m", "malora_dist.commands.sweep", "run-index", str(p["index"]), "--out", sweep_dir)])
            for p in points]
    work.append(("base", [_python("launch/evaluate.py", "--config", config, *set_args,
                                  "--rows-per-batch", str(size["rows_per_batch"]), *limit,
                                  "--output", os.path.join(out, "base_model_eval.json"))]))
    # the points first, the base model's scoring last: it needs no training and fills the tail
    stage("points", lambda: jobs.run(work, deadline))
    timings["jobs"] = jobs.times
    stage("table", lambda: subprocess.run(_python("-m", "malora_dist.commands.sweep", "table", "--out", sweep_dir),
                                          cwd=REPO, env=env, check=True))
    mixtures = [p for p in points if p["values"]["adapter.method"] != "lora"
                and os.path.isdir(os.path.join(sweep_dir, "points", p["name"], "run", "adapter"))]
    labels = [f"{p['values']['adapter.method']}_s{p['values']['train.seed']}" for p in mixtures]
    adapters = [os.path.join(sweep_dir, "points", p["name"], "run", "adapter") for p in mixtures]
    analysis = _python("-m", "malora_dist.commands.analyze", *adapters, "--out", os.path.join(out, "analysis"),
                       "--delta", "--routing-examples", str(size["routing_examples"]), "--labels", ",".join(labels),
                       "--jobs", str(size["analysis_jobs"]))
    if adapters:  # none when the guard ended every point before its adapter was written
        stage("analysis", lambda: subprocess.run(analysis, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL))
    timings["failed"] = jobs.failed
    timings["total_s"] = round(time.time() - start, 1)
    with open(os.path.join(out, "kit_timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="here: write .kit/ for the GPU machine")
    packing.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "commonsense"),
                         help="the five tasks' files (the layout the study's config names)")
    packing.add_argument("--parts", type=int, default=0, help="at least this many parts (default: as few as fit)")
    sub.add_parser("receive", help="there: keep the parts this call carried; unpack once all are there")
    run = sub.add_parser("study", help="run the study at a scale")
    run.add_argument("--scale", choices=sorted(SCALES), default="gpu")
    run.add_argument("--out", required=True)
    run.add_argument("--data", help="the tasks' files, in place of the config's offline copies")
    run.add_argument("--model", help="the GGUF to load, in place of the config's")
    run.add_argument("--budget-s", type=float, default=1e9, help="end the points still running after this many seconds")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="for every point")
    args = parser.parse_args(argv)
    if args.command == "pack":
        manifest = pack(args.data, args.parts)
        print(json.dumps(manifest, indent=1))
        return 0
    if args.command == "receive":
        receive()  # a call with one part of several keeps it and waits for the next call's
        return 0
    timings = study(args.scale, args.out, args.data, args.model, args.budget_s, args.set)
    print(json.dumps(timings, indent=1))
    return 1 if timings["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
