"""The package as a user installs it: a wheel built from a clean copy of the sources, installed into
a fresh virtual environment outside the repository, runs its commands from there.

The fresh environment reuses this environment's dependencies (a ``.pth`` line naming its
site-packages, after the fresh one's own) and gets the wheel itself with ``--no-deps``, so the test
needs no network; that the wheel, not the repository, is imported is checked.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from training_support import REPO, TINY

CONFIGS = os.path.join(REPO, "configs")
pytestmark = pytest.mark.slow


def run(cmd, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def package_modules(root):
    return {os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
            for d, _, files in os.walk(os.path.join(root, "malora_dist")) for f in files if f.endswith(".py")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    shutil.copytree(os.path.join(REPO, "malora_dist"), src / "malora_dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    # The installed setuptools builds it offline; without one (Python ≥ 3.12 venvs) pip fetches it.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(src)],
        cwd=tmp)
    (wheel,) = (tmp / "dist").glob("malora_dist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    assert shipped == package_modules(REPO)  # every module, adapters/ included

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        cwd=tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return venv, site, work


def test_the_wheel_is_what_is_imported(installed):
    venv, site, work = installed
    where = run([str(venv / "bin" / "python"), "-c", "import malora_dist.adapters.layer as m; print(m.__file__)"],
                cwd=work)
    assert where.strip().startswith(site)


def test_params_train_and_evaluate_from_the_wheel(installed):
    venv, _, work = installed
    bin_dir = venv / "bin"
    report = json.loads(run([str(bin_dir / "python"), "-m", "malora_dist.commands.params", "--model-config",
                             os.path.join(CONFIGS, "models", "llama2-7b.json"), "--adapter-config",
                             os.path.join(CONFIGS, "adapters", "malora.yaml")], cwd=work))
    assert report["trainable_params"] > 0
    run([str(bin_dir / "malora-train"), "--config", TINY, "--set", "train.steps=2", "--set", "train.output_dir=run"],
        cwd=work)
    assert os.path.isfile(work / "run" / "adapter" / "adapter_model.safetensors")
    out = run([str(bin_dir / "malora-eval"), "--config", TINY, "--adapter", "run/adapter", "--task",
               "cap=synthetic:capitals", "--limit", "3", "--output", "eval.json"], cwd=work)
    assert "cap" in out and json.loads((work / "eval.json").read_text())["tasks"]["cap"]["n"] == 3
    for command in ("malora-generate", "malora-lm-eval", "malora-export", "malora-params", "malora-plan"):
        assert (bin_dir / command).exists(), command
