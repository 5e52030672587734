"""Reliability: a rank killed under torchrun, SIGTERM before a time limit, non-finite losses, hangs.

The crash and signal tests run the real entry point (``launch/train.py`` under ``torchrun``, or as
plain processes with RANK/WORLD_SIZE/MASTER_*) on configs/tiny.yaml and judge the workers by what
they leave behind (metrics.jsonl, checkpoints, per-rank logs), never by torchrun's exit code alone.
Their reference is an uninterrupted run of the same config and layout (dp=2), made in the
``run_world`` world that also hosts the non-finite-loss runs (one spawn for both).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from training_support import REPO, TINY
from world import run_world

from malora_dist.runtime.distributed import free_port
from malora_dist.train.metrics_log import read_metrics

pytestmark = pytest.mark.slow  # multi-process worlds (the fast tier: pytest -m "not slow")

STEPS = 12
# One micro-batch per rank and step; a checkpoint every 2 steps, so a crash loses at most 2.
CLI_SET = [f"train.steps={STEPS}", "checkpoint.interval=2", "train.global_batch_size=4"]
WORKER_ENV = dict(OMP_NUM_THREADS="1", MALORA_LOG_ALL_RANKS="1", TOKENIZERS_PARALLELISM="false")
START_TIMEOUT_S = 240  # process start-up on 2 busy cores is slow: imports, the tokenizer
TORCHRUN_KILL_GRACE_S = 30  # torchrun SIGKILLs workers that ignore its SIGTERM for this long
HANG_TIMEOUT_S = 6  # parallel.timeout_s of the hang tests (also bounds their start-up rendezvous)
# The survivor's measured exit time includes its interpreter teardown, seconds on a loaded 2-core
# machine; the bounds stay far below the 30-minute hang they guard against.
EXIT_SLACK_S = 10


# ---- helpers ------------------------------------------------------------------------------------


def loss_rows(output_dir):
    return [r for r in read_metrics(output_dir) if "loss" in r]


def last_step(output_dir):
    try:
        return max((r["step"] for r in read_metrics(output_dir)), default=0)
    except (OSError, json.JSONDecodeError):  # not there yet, or a row half-written
        return 0


def wait_for_step(output_dir, step, procs, timeout=START_TIMEOUT_S):
    """Poll metrics.jsonl until a row with ``step`` or more; fail if a process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = last_step(output_dir)
        if seen >= step:
            return seen
        exited = [p.returncode for p in procs if p.poll() is not None]
        assert not exited, f"a process exited (codes {exited}) before step {step} was logged"
        time.sleep(0.05)
    raise AssertionError(f"no metrics row for step {step} within {timeout}s")


def torchrun(output_dir, log_dir, *extra_args, sets=()):
    """launch/train.py under torchrun, 2 workers; each worker's stdout/stderr in ``log_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *extra_args,
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "--log-dir", log_dir, "--redirects", "3",
           "launch/train.py", "--config", TINY, "--set", f"train.output_dir={output_dir}"]
    for item in [*CLI_SET, *sets]:
        cmd += ["--set", item]
    os.makedirs(log_dir, exist_ok=True)
    own_log = open(os.path.join(log_dir, "torchrun.log"), "w")
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **WORKER_ENV}, stdout=own_log,
                            stderr=subprocess.STDOUT)


def kill_tree(proc):
    """SIGKILL a process and everything it started (torchrun puts workers in their own sessions)."""
    if proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
    proc.wait()


@pytest.fixture
def launched():
    """Processes a test starts; whatever still runs when it ends (a failed test) is killed."""
    procs = []
    yield procs
    for proc in procs:
        kill_tree(proc)


def finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"{proc.args[:3]} did not finish within {timeout}s") from None


def worker_log(log_dir, attempt, local_rank):
    paths = glob.glob(os.path.join(log_dir, "*", f"attempt_{attempt}", str(local_rank), "stderr.log"))
    assert len(paths) == 1, f"no log of attempt {attempt}, local rank {local_rank} in {log_dir}"
    with open(paths[0]) as f:
        return f.read()


def descendants(pid):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def torchrun_worker(agent_pid, local_rank, attempt=0):
    """The pid of the worker process that torchrun started for ``local_rank`` in ``attempt``."""
    found = [pid for pid in descendants(agent_pid)
             if environ(pid).get("LOCAL_RANK") == str(local_rank)
             and environ(pid).get("TORCHELASTIC_RESTART_COUNT") == str(attempt)]
    assert len(found) == 1, f"expected one worker with LOCAL_RANK={local_rank}, found {found}"
    return found[0]


def assert_same_losses(rows, reference):
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(rows, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]


# ---- the run_world world: the reference run and the non-finite-loss runs -----------------------


class _NaNGradient(torch.autograd.Function):
    """Identity forward (a finite loss), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNAt:
    """Hooks: on rank ``rank``, make the loss (or only its gradient) NaN at the 1-based ``steps``;
    on every rank, keep the adapter parameters as they are when each step starts."""

    def __init__(self, steps, rank=1, gradient_only=False):
        self.steps, self.rank, self.gradient_only = set(steps), rank, gradient_only
        self.trainer = None
        self.at_start = {}  # 1-based step -> parameters before that step's update

    def on_start(self, trainer):
        self.trainer = trainer

    def fault_injector(self, step0, loss):
        """Given to the trainer at construction (``run_training``'s hooks); runs after ``on_start``."""
        import torch.distributed as dist

        self.at_start.setdefault(step0 + 1, [p.detach().clone() for p in self.trainer.params])
        if dist.get_rank() == self.rank and step0 + 1 in self.steps:
            return _NaNGradient.apply(loss) if self.gradient_only else loss * float("nan")
        return loss

    def updates(self):
        """{step: largest parameter change made by that step}, for the steps that started."""
        final = [p.detach().clone() for p in self.trainer.params]
        out = {}
        for step, before in self.at_start.items():
            after = self.at_start.get(step + 1, final)
            out[step] = max(float((a - b).abs().max()) for a, b in zip(after, before))
        return out


# name -> (extra --set items, hooks factory)
NONFINITE = {
    "abort": (["train.steps=3", "train.nonfinite=abort"], lambda: NaNAt([3])),
    "skip": (["train.steps=4", "train.nonfinite=skip", "train.max_consecutive_skips=1"], lambda: NaNAt([3])),
    "skip_gradient_ep2": (["train.steps=4", "train.nonfinite=skip", "parallel.ep=2"],
                          lambda: NaNAt([3], gradient_only=True)),
    "too_many_skips": (["train.steps=4", "train.nonfinite=skip", "train.max_consecutive_skips=1"],
                       lambda: NaNAt([3, 4])),
}


def world_main(root):
    from malora_dist.config.run import load_run_config
    from malora_dist.train import run as run_module
    from malora_dist.train.trainer import NonFiniteError

    # Loading the tokenizer takes seconds and every run here uses the same one.
    load, cache = run_module.load_run_tokenizer, {}

    def cached_tokenizer(model):
        if model.tokenizer not in cache:
            cache[model.tokenizer] = load(model)
        return cache[model.tokenizer]

    run_module.load_run_tokenizer = cached_tokenizer

    out = {}
    reference = load_run_config(TINY, CLI_SET + [f"train.output_dir={os.path.join(root, 'reference')}"])
    run_module.run_training(reference)
    for name, (sets, make_hooks) in NONFINITE.items():
        overrides = CLI_SET + ["checkpoint.interval=0", f"train.output_dir={os.path.join(root, name)}", *sets]
        hooks = make_hooks()
        error = None
        try:
            run_module.run_training(load_run_config(TINY, overrides), hooks)
        except NonFiniteError as err:
            error = str(err)
        out[name] = {"error": error, "updates": hooks.updates(),
                     "final": [p.detach().clone() for p in hooks.trainer.params], "ep": hooks.trainer.groups.ep}
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reliability_world"))
    return root, run_world(2, world_main, root)


@pytest.fixture(scope="module")
def reference(world):
    root, _ = world
    rows = loss_rows(os.path.join(root, "reference"))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


# ---- non-finite losses ----------------------------------------------------------------------------


def test_nonfinite_abort_stops_every_rank_before_the_update(world):
    root, per_rank = world
    for rank, result in enumerate(per_rank):
        case = result["abort"]
        assert case["error"] is not None, f"rank {rank} did not abort"
        assert re.search(r"\bat step 3\b", case["error"]) and "train.nonfinite=abort" in case["error"], case["error"]
        updates = case["updates"]
        assert updates[1] > 0 and updates[2] > 0  # training did change the parameters before
        assert updates[3] == 0.0, f"rank {rank}: parameters changed by the aborted step 3"
    assert [r["step"] for r in loss_rows(os.path.join(root, "abort"))] == [1, 2]


@pytest.mark.parametrize("name", ["skip", "skip_gradient_ep2"])
def test_nonfinite_skip_skips_the_step_on_every_rank(world, name):
    root, per_rank = world
    steps = 4
    for rank, result in enumerate(per_rank):
        case = result[name]
        assert case["error"] is None, f"rank {rank}: {case['error']}"
        updates = case["updates"]
        assert sorted(updates) == list(range(1, steps + 1))
        assert updates[3] == 0.0, f"rank {rank}: parameters changed by the skipped step 3"
        assert all(updates[s] > 0 for s in updates if s != 3), (rank, updates)  # and training went on
    if per_rank[0][name]["ep"] == 1:  # dp replicas stay identical through the skip
        for a, b in zip(per_rank[0][name]["final"], per_rank[1][name]["final"]):
            assert torch.equal(a, b)
    rows = loss_rows(os.path.join(root, name))
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["skipped_steps"] for r in rows] == [0, 0] + [1] * (steps - 2)
    if name == "skip":
        assert math.isnan(rows[2]["loss"])
    else:  # only the gradient was NaN: the loss is finite, the step is still skipped
        assert math.isfinite(rows[2]["loss"]) and not math.isfinite(rows[2]["grad_norm"])
    assert all(math.isfinite(r["loss"]) for r in rows[3:])


def test_too_many_consecutive_skips_abort_every_rank(world):
    root, per_rank = world
    for rank, result in enumerate(per_rank):
        error = result["too_many_skips"]["error"]
        assert error is not None, f"rank {rank} did not abort"
        assert "2 consecutive non-finite steps" in error and "train.max_consecutive_skips=1" in error, error
        assert result["too_many_skips"]["updates"][4] == 0.0
    assert [r["skipped_steps"] for r in loss_rows(os.path.join(root, "too_many_skips"))] == [0, 0, 1]


# ---- a rank killed under torchrun ------------------------------------------------------------------


def test_killed_rank_restarts_and_matches_uninterrupted_run(reference, tmp_path, launched):
    out, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    agent = torchrun(out, logs, "--max-restarts=1")
    launched.append(agent)
    killed_at = wait_for_step(out, 5, [agent])
    victim = torchrun_worker(agent.pid, local_rank=1, attempt=0)
    os.kill(victim, signal.SIGKILL)
    assert finish(agent, 300) == 0, open(os.path.join(logs, "torchrun.log")).read()[-3000:]
    assert killed_at < STEPS, "the run ended before the kill: nothing was tested"

    restarted = worker_log(logs, 1, 0)  # attempt 1 exists: torchrun did restart the workers
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", restarted)
    assert resumed, restarted[-2000:]
    # From a checkpoint of the interrupted attempt (every 2 steps), not from scratch or the end.
    assert 2 <= int(resumed.group(2)) < STEPS and int(resumed.group(2)) % 2 == 0
    worker_log(logs, 1, 1)
    assert os.path.exists(os.path.join(out, "checkpoints", f"step_{STEPS}", "COMPLETE"))
    assert_same_losses(loss_rows(out), reference)


# ---- SIGTERM to the job (SLURM before a time limit) -------------------------------------------------

STOP_MESSAGE = re.compile(r"stop requested \(SIGTERM\): saved step (\d+) on every rank")


def test_sigterm_saves_the_same_step_on_every_rank_and_resumes(reference, tmp_path, launched):
    out, logs = str(tmp_path / "run"), str(tmp_path / "logs")
    agent = torchrun(out, logs)
    launched.append(agent)
    wait_for_step(out, 3, [agent])
    agent.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    finish(agent, 120)  # non-zero by design: judged by the workers below
    elapsed = time.monotonic() - sent
    print(f"torchrun and its workers exited {elapsed:.1f}s after SIGTERM")
    agent_log = open(os.path.join(logs, "torchrun.log")).read()
    assert elapsed < TORCHRUN_KILL_GRACE_S and "Unable to shutdown process" not in agent_log, \
        (elapsed, agent_log[-2000:])

    saved = []
    for rank in (0, 1):
        log = worker_log(logs, 0, rank)
        match = STOP_MESSAGE.search(log)
        assert match and "Traceback" not in log, f"rank {rank} did not stop cleanly:\n{log[-2000:]}"
        saved.append(int(match.group(1)))
    step = saved[0]
    assert saved == [step, step] and 3 <= step < STEPS
    checkpoint = os.path.join(out, "checkpoints", f"step_{step}")
    assert os.path.exists(os.path.join(checkpoint, "COMPLETE"))
    with open(os.path.join(checkpoint, "meta.json")) as f:
        assert json.load(f)["step"] == step
    newest = max(int(d.split("_")[1]) for d in os.listdir(os.path.join(out, "checkpoints"))
                 if re.fullmatch(r"step_\d+", d))
    assert newest == step
    assert [r["step"] for r in loss_rows(out)] == list(range(1, step + 1))
    assert not os.path.exists(os.path.join(out, "adapter"))  # unfinished runs export nothing

    resumed_logs = str(tmp_path / "logs_resumed")
    agent = torchrun(out, resumed_logs)
    launched.append(agent)
    assert finish(agent, 300) == 0
    assert f"resumed from {checkpoint} at step {step}" in worker_log(resumed_logs, 0, 0)
    assert_same_losses(loss_rows(out), reference)


# ---- a rank lost outside torchrun's supervision ------------------------------------------------------


def plain_pair(output_dir, logs):
    """launch/train.py as two plain processes (RANK/WORLD_SIZE/MASTER_*), a long run."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = {**os.environ, **WORKER_ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.pop("TORCHELASTIC_RESTART_COUNT", None)
        cmd = [sys.executable, "launch/train.py", "--config", TINY, "--set", f"train.output_dir={output_dir}",
               "--set", "train.steps=1000", "--set", "train.global_batch_size=4", "--set", "checkpoint.interval=0",
               "--set", f"parallel.timeout_s={HANG_TIMEOUT_S}"]
        log = open(f"{logs}.rank{rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.fixture(scope="module")
def lost_peer(tmp_path_factory):
    """Two pairs at once (start-up dominates): in one, rank 1 is SIGKILLed (its sockets close);
    in the other SIGSTOPped (a frozen peer: its sockets stay open, only a timeout can tell).
    Returns, per signal: the survivor's exit code (None: still running when given up on), the
    seconds it took, and its log."""
    root = tmp_path_factory.mktemp("lost_peer")
    pairs = {sig: (str(root / sig.name), plain_pair(str(root / sig.name), str(root / sig.name))) for sig in
             (signal.SIGKILL, signal.SIGSTOP)}
    results = {}
    try:
        for sig, (out, (survivor, victim)) in pairs.items():
            wait_for_step(out, 2, [survivor, victim])
            victim.send_signal(sig)
            sent = time.monotonic()
            try:
                code = survivor.wait(timeout=2 * HANG_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                code = None
            results[sig] = (code, time.monotonic() - sent, open(f"{out}.rank0.log").read())
            print(f"{sig.name} to rank 1: rank 0 exit code {code} after {results[sig][1]:.1f}s")
    finally:
        for _, procs in pairs.values():
            for proc in procs:
                kill_tree(proc)
    return results


def test_survivor_of_a_killed_peer_exits_with_an_error(lost_peer):
    code, seconds, log = lost_peer[signal.SIGKILL]
    assert code not in (None, 0), f"survivor exit code {code}:\n{log[-2000:]}"
    assert seconds < HANG_TIMEOUT_S + EXIT_SLACK_S, seconds
    assert "Traceback" in log


def test_survivor_of_a_frozen_peer_exits_within_the_timeout(lost_peer):
    code, seconds, log = lost_peer[signal.SIGSTOP]
    # The timed-out collective ends the run; shutdown skips its barrier on the error path.
    assert code not in (None, 0), f"survivor still running {seconds:.0f}s after its peer froze:\n{log[-2000:]}"
    assert seconds < HANG_TIMEOUT_S + EXIT_SLACK_S, seconds
