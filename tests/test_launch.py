"""Launching: SLURM templates and environment, torchrun with 2 processes, two nodes on this machine."""

import json
import os
import subprocess
import sys

import pytest
from training_support import REPO, synthetic_dir, tiny_config

from malora_dist.runtime.distributed import free_port
from malora_dist.runtime.launch_env import expand_nodelist, resolve_launch_env

SLURM_DIR = os.path.join(REPO, "launch", "slurm")
TEMPLATES = ["torchrun_multinode.sbatch", "srun_ranks.sbatch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TRAIN = os.path.join(REPO, "launch", "train.py")


@pytest.mark.parametrize("template", TEMPLATES)
def test_slurm_templates_parse(template):
    subprocess.run(["bash", "-n", os.path.join(SLURM_DIR, template)], check=True)


def test_expand_nodelist():
    assert expand_nodelist("gpu[07-09,12],login1,c[9-10]") == [
        "gpu07", "gpu08", "gpu09", "gpu12", "login1", "c9", "c10"]


def test_slurm_ranks_and_master():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
           "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_JOB_ID": "4242"}
    launch = resolve_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (13, 16, 5)
    assert launch.master_addr == "node3" and launch.master_port == 29500 + 242
    assert launch.launcher == "slurm"


def test_torchrun_variables_take_precedence_over_slurm():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node1",
           "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "node9", "MASTER_PORT": "1234"}
    launch = resolve_launch_env(env)
    assert (launch.rank, launch.world_size, launch.master_addr, launch.launcher) == (3, 8, "node9", "torchrun")


def test_broken_launch_environment_names_the_variable():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        resolve_launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        resolve_launch_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"})


def sbatch_job(template, tmp_path, submit_dir, extra_env=None):
    """Run ``template`` as ``sbatch`` does: a copy in a spool directory, started in the submit
    directory with the job's SLURM variables, and a stand-in ``srun`` that records its command."""
    spool = tmp_path / "spool" / "job1234"
    spool.mkdir(parents=True)
    script = spool / "slurm_script"
    with open(os.path.join(SLURM_DIR, template)) as f:
        script.write_text(f.read())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "srun.json"
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\n"
        f"{sys.executable} -c 'import json,os,sys; json.dump({{\"argv\": sys.argv[1:], "
        f"\"MASTER_ADDR\": os.environ.get(\"MASTER_ADDR\"), \"MASTER_PORT\": os.environ.get(\"MASTER_PORT\")}}, "
        f"open(\"{record}\", \"w\"))' \"$@\"\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_JOB_NODELIST": "gpu[07-08,10]", "SLURM_JOB_NUM_NODES": "3",
           "SLURM_JOB_ID": "1234", "SLURM_GPUS_PER_NODE": "8"}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "REPO", "PYTHONPATH"):
        env.pop(key, None)
    env.update(extra_env or {})
    done = subprocess.run(["bash", str(script), "configs/x.yaml", "--set", "train.steps=3"],
                          env=env, cwd=submit_dir, capture_output=True, text=True)
    return done, (json.loads(record.read_text()) if record.exists() else None)


@pytest.mark.parametrize("template", TEMPLATES)
def test_slurm_templates_build_the_launch_command(template, tmp_path):
    done, called = sbatch_job(template, tmp_path, REPO)
    assert done.returncode == 0, done.stderr
    argv = called["argv"]
    assert called["MASTER_PORT"] == "29734"
    assert argv[-4:] == ["--config", "configs/x.yaml", "--set", "train.steps=3"]
    if template == "torchrun_multinode.sbatch":
        assert called["MASTER_ADDR"] == "gpu07"
        joined = " ".join(argv)
        assert "--nnodes 3 --nproc_per_node 8" in joined and "--rdzv_endpoint gpu07:29734" in joined
    assert argv[-5] == os.path.join(REPO, "launch", "train.py")


@pytest.mark.parametrize("template", TEMPLATES)
def test_slurm_templates_find_the_repo_or_say_how(template, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done, called = sbatch_job(template, tmp_path, elsewhere)
    assert done.returncode == 2 and called is None
    assert "submit from the repository's root or set REPO=" in done.stderr
    (tmp_path / "explicit").mkdir()
    done, called = sbatch_job(template, tmp_path / "explicit", elsewhere, {"REPO": REPO})
    assert done.returncode == 0, done.stderr
    assert called["argv"][-5] == os.path.join(REPO, "launch", "train.py")


# ---- real launches ------------------------------------------------------------------------------
def write_config(tmp_path, name, **sections):
    import yaml

    # 16 experts at top-1 on a few hundred tokens: some get none (the idle-expert summary test).
    config = tiny_config(synthetic_dir(str(tmp_path)), str(tmp_path / name),
                         adapter=dict(dropout=0.0, balance_loss_coef=0.0, num_experts=16, top_k=1), **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def losses(tmp_path, name):
    with open(tmp_path / name / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("launch")
    single = run([sys.executable, TRAIN, "--config", write_config(tmp_path, "single")])
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / "single.stderr").write_text(single.stderr)
    two = run(TORCHRUN + ["--nproc_per_node", "2", TRAIN, "--config",
                          write_config(tmp_path, "torchrun_ep2", parallel=dict(ep=2))])
    assert two.returncode == 0, two.stderr[-3000:]
    # Two "nodes" on this machine: two torchrun agents, static rendezvous on 127.0.0.1.
    port = free_port()
    config = write_config(tmp_path, "two_nodes")
    nodes = [subprocess.Popen(TORCHRUN + ["--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
                                          "--master_addr", "127.0.0.1", "--master_port", str(port),
                                          TRAIN, "--config", config],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [n.communicate(timeout=600)[0] for n in nodes]
    for node, out in zip(nodes, outputs):
        assert node.returncode == 0, out[-3000:]
    return tmp_path


@pytest.mark.slow
def test_torchrun_two_processes_trains(launched):
    rows = losses(launched, "torchrun_ep2")
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "time_forward_s", "time_backward_s",
                "time_optimizer_s", "task_loss", "expert_load", "a2a_bytes"):
        assert key in rows[0], key
    values = [r["loss"] for r in rows]
    assert all(v == v and abs(v) < 1e9 for v in values)
    assert sum(values[-2:]) < sum(values[:2])  # falling on a learnable task


@pytest.mark.slow
def test_two_nodes_match_one_node(launched):
    one, two = losses(launched, "single"), losses(launched, "two_nodes")
    assert len(one) == len(two) == 8
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    info = json.loads((launched / "two_nodes" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["layout"]["dp"] == 2


@pytest.mark.slow
def test_idle_experts_are_summarised_once_per_log_interval(launched):
    """One log line for each logged step at which some (layer, expert) got no tokens for the first
    time, none per expert; the per-step count is in the metrics."""
    seen, first_time_steps = set(), 0
    for row in losses(launched, "single"):
        empty = {(layer, e) for layer, load in row["expert_load"].items() for e, c in enumerate(load) if c == 0}
        assert row["empty_experts"] == len(empty)
        first_time_steps += bool(empty - seen)
        seen |= empty
    assert first_time_steps > 0
    lines = (launched / "single.stderr").read_text().splitlines()
    assert not [line for line in lines if "received no tokens at step" in line]
    assert len([line for line in lines if "received no tokens for the first time" in line]) == first_time_steps
