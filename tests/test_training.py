"""Training runs: layout parity, resume parity, resharding, incomplete checkpoints, export,
activation checkpointing.

Runs share one process world per world size (``run_world``); each world runs several trainings of
configs/tiny.yaml on the project's synthetic data. Layout parity compares the per-step loss and
grad_norm of 8 steps across 1 process, dp=2, ep=2, tp=2, dp=4 and tp=2×ep=2, with the settings
users train with: adapter dropout, the balance loss and the router z-loss on. Activation
checkpointing (every decoder layer recomputed in backward) must not change a run: the single and
tp=2 runs are repeated with it, with dropout on.
"""

import json
import os
import shutil
import warnings

import pytest
import torch
from training_support import Record, StopAfter, synthetic_dir, tiny_config
from world import run_world

from malora_dist.config.run import build_run_config
from malora_dist.models import build_tiny_causal_lm
from malora_dist.parallel.adapter_files import load_adapter
from malora_dist.train.metrics_log import read_metrics
from malora_dist.train.run import run_training

pytestmark = pytest.mark.slow  # multi-process worlds (the fast tier: pytest -m "not slow")

# Parity runs as the paper trains: adapter dropout 0.05 (its masks are a function of each token's
# place in the global batch, not of the rank) and the balance loss at 0.01 (over each micro-batch
# of 2 sequences: the 1-process run accumulates 4 of them, dp=4 runs one per rank), plus a router
# z-loss. 1 process is the reference for every other layout.
PARITY = dict(adapter=dict(dropout=0.05, balance_loss_coef=0.01, router_z_loss_coef=1e-3))
# Heavier dropout for the replica test: tp peers must keep identical replicated tensors.
DROPOUT_01 = dict(adapter=dict(PARITY["adapter"], dropout=0.1), train=dict(steps=4))
PROBE = torch.tensor([[1, 17, 230, 4051, 99, 7, 12, 3000]])

# name -> (world size, section overrides)
RUNS = {
    "single": (1, dict(PARITY)),
    "dp2": (2, dict(PARITY)),
    "ep2": (2, dict(PARITY, parallel=dict(ep=2))),
    "tp2": (2, dict(PARITY, parallel=dict(tp=2))),
    "dp4": (4, dict(PARITY)),
    "tp2ep2": (4, dict(PARITY, parallel=dict(tp=2, ep=2))),
}
# name -> the run it repeats with train.activation_checkpointing: true
RECOMPUTED = {"single_recompute": "single", "tp2_recompute": "tp2"}


def world_main(root, jobs):
    """jobs: list of (name, overrides, hooks, resume_from_run_step)."""
    out = {}
    data = synthetic_dir(root)
    for name, overrides, hooks, resume in jobs:
        overrides = dict(overrides)
        if resume is not None:
            run, step = resume
            overrides["checkpoint"] = dict(resume=os.path.join(root, run, "checkpoints", f"step_{step}"))
        config = build_run_config(tiny_config(data, os.path.join(root, name), **overrides))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_training(config, hooks)
        out[name] = {
            "start_step": getattr(hooks, "start_step", None),
            "start_state": getattr(hooks, "start_state", None),
            "logits": getattr(hooks, "logits", None),
            "replica_gaps": getattr(hooks, "replica_gaps", None),
            "mlp_runs": getattr(hooks, "mlp_runs_in_training", None),
            "warnings": [str(w.message) for w in caught],
        }
    return out


def write_old_checkpoints(root):
    """The dp=2 run's step-4 checkpoint as a version before the balance-loss record would have
    written it: without the record, once as written at dp=2 and once at dp=1 (a checkpoint's tensors
    are the same at every layout; only its meta says which layout wrote it)."""
    source = os.path.join(root, "dp2", "checkpoints", "step_4")
    for run, dp in (("old_dp2", 2), ("old_dp1", 1)):
        target = os.path.join(root, run, "checkpoints", "step_4")
        shutil.copytree(source, target)
        with open(os.path.join(target, "meta.json")) as f:
            meta = json.load(f)
        meta.pop("balance_loss", None)
        meta["layout"]["dp"] = dp
        with open(os.path.join(target, "meta.json"), "w") as f:
            json.dump(meta, f)


def rows(root, name):
    return [r for r in read_metrics(os.path.join(root, name)) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("training"))
    synthetic_dir(root)
    results = {}
    by_world = {}
    for name, (world, overrides) in RUNS.items():
        by_world.setdefault(world, []).append((name, overrides, Record(PROBE), None))
    for name, plain in RECOMPUTED.items():
        world, overrides = RUNS[plain]
        recompute = dict(overrides, train=dict(activation_checkpointing=True))
        by_world[world].append((name, recompute, Record(PROBE), None))
    # Resume parity at ep=2: 4 steps, stop (SIGTERM path), then resume to 8.
    ep2 = RUNS["ep2"][1]
    by_world[2] += [("ep2_stopped", ep2, StopAfter(4), None), ("ep2_stopped", ep2, Record(), None)]
    # Resharding: the ep=2 checkpoint of step 4 continues at ep=1 and ep=4; tp=2 → tp=1.
    by_world[1] += [("from_ep2_to_ep1", RUNS["single"][1], Record(), ("ep2", 4)),
                    ("from_tp2_to_tp1", RUNS["single"][1], Record(), ("tp2", 4))]
    # Checkpoints written before the balance loss's token set was recorded resume (write_old_checkpoints).
    by_world[1] += [("from_old_dp2", RUNS["single"][1], Record(), ("old_dp2", 4)),
                    ("from_old_dp1", RUNS["single"][1], Record(), ("old_dp1", 4))]
    by_world[4] += [("from_ep2_to_ep4", dict(PARITY, parallel=dict(ep=4)), Record(), ("ep2", 4))]
    # Replicated adapter tensors stay bit-identical across tp peers and dp replicas with dropout 0.1.
    by_world[2] += [("tp2_dropout01", dict(DROPOUT_01, parallel=dict(tp=2)), Record(), None)]
    by_world[4] += [("tp2ep2_dropout01", dict(DROPOUT_01, parallel=dict(tp=2, ep=2)), Record(), None)]
    # A bf16 base (fp32 adapter master weights, bf16 products and exchange) at ep=2.
    by_world[2] += [("ep2_bf16", dict(ep2, model=dict(dtype="bfloat16")), Record(), None)]
    # Worlds in the order that makes the checkpoints exist before they are resumed.
    for world in (2, 1, 4):
        if world == 1:
            write_old_checkpoints(root)
        per_rank = run_world(world, world_main, root, by_world[world])
        for name, value in per_rank[0].items():
            value = dict(value, replica_gaps=[r[name]["replica_gaps"] for r in per_rank])  # every rank's view
            results.setdefault(name, []).append(value)
    return root, results


def test_metrics_fields(trained):
    root, _ = trained
    row = rows(root, "ep2")[0]
    for key in ("step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "time_forward_s",
                "time_backward_s", "time_optimizer_s", "task_loss", "expert_load", "a2a_bytes", "rss_mb"):
        assert key in row, key
    assert row["step"] == 1 and row["a2a_bytes"] > 0
    assert row["empty_experts"] == sum(load.count(0) for load in row["expert_load"].values())
    assert set(row["task_loss"]) <= {"capitals", "larger", "parity"}


@pytest.mark.parametrize("name", [n for n in RUNS if n != "single"])
def test_layout_parity(trained, name):
    root, _ = trained
    reference, other = rows(root, "single"), rows(root, name)
    assert [r["step"] for r in other] == list(range(1, 9)) == [r["step"] for r in reference]
    for a, b in zip(other, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (name, a["step"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (name, a["step"])
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-4), (name, a["step"])
        assert a["expert_load"] == b["expert_load"], (name, a["step"])
    assert reference[-1]["loss"] < reference[0]["loss"]
    # The router losses are on: the balance loss near 1 (its value at even load) times 0.01, plus
    # the z-loss (1e-3 times logsumexp² ≈ log(4)²).
    assert all(r["aux_loss"] > 0.01 for r in reference)


@pytest.mark.parametrize("name", ["tp2_dropout01", "tp2ep2_dropout01", "tp2", "tp2ep2", "dp4", "ep2"])
def test_replicated_tensors_stay_identical_with_dropout(trained, name):
    _, results = trained
    for rank, gaps in enumerate(results[name][0]["replica_gaps"]):
        assert gaps and any("shared_A" in k for k in gaps)
        differing = {k: v for k, v in gaps.items() if v != 0.0}
        assert not differing, (name, rank, differing)


def test_bf16_base_trains_close_to_fp32(trained):
    root, _ = trained
    fp32, bf16 = rows(root, "ep2"), rows(root, "ep2_bf16")
    assert [r["step"] for r in bf16] == list(range(1, 9))
    for a, b in zip(bf16, fp32):  # bf16 rounding (8 bits of mantissa) through 2 layers, not a bug
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), a["step"]
    assert bf16[-1]["loss"] < bf16[0]["loss"]
    saved = load_adapter_file(root, "ep2_bf16")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())


def test_resume_parity(trained):
    root, results = trained
    straight, resumed = rows(root, "ep2"), rows(root, "ep2_stopped")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert results["ep2_stopped"][0]["start_step"] == 4  # the second (resumed) run's record
    assert not [w for w in results["ep2_stopped"][0]["warnings"] if "balance loss" in w]
    for a, b in zip(resumed, straight):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]
    final_a = load_adapter_file(root, "ep2")
    final_b = load_adapter_file(root, "ep2_stopped")
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,plain", RECOMPUTED.items())
def test_activation_checkpointing_changes_nothing(trained, name, plain):
    """Same losses and gradient norms at every step, and the same trained adapter (which every
    step's gradients shaped through AdamW); the end-of-run logits agree as well."""
    root, results = trained
    recomputed, reference = rows(root, name), rows(root, plain)
    assert [r["step"] for r in recomputed] == list(range(1, 9))
    for a, b in zip(recomputed, reference):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6), a["step"]
    final, final_ref = load_adapter_file(root, name), load_adapter_file(root, plain)
    assert final.keys() == final_ref.keys() and final
    for key in final:
        torch.testing.assert_close(final[key], final_ref[key], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[name][0]["logits"], results[plain][0]["logits"], rtol=1e-5, atol=1e-6)
    # It did recompute: each layer's MLP ran twice per micro-batch (forward, recompute), not once.
    runs, plain_runs = results[name][0]["mlp_runs"], results[plain][0]["mlp_runs"]
    assert plain_runs > 0 and runs == 2 * plain_runs, (runs, plain_runs)


def load_adapter_file(root, name):
    from safetensors.torch import load_file

    return load_file(os.path.join(root, name, "adapter", "adapter_model.safetensors"))


@pytest.mark.parametrize("name,source", [("from_ep2_to_ep1", "ep2"), ("from_ep2_to_ep4", "ep2"),
                                         ("from_tp2_to_tp1", "tp2")])
def test_reshard_resume(trained, name, source):
    root, results = trained
    result = results[name][0]
    assert result["start_step"] == 4
    checkpoint_state = read_checkpoint(os.path.join(root, source, "checkpoints", "step_4"))
    for key, value in result["start_state"].items():
        torch.testing.assert_close(value, checkpoint_state[key], rtol=0, atol=0)
    continued, original = rows(root, name), rows(root, source)
    assert [r["step"] for r in continued] == list(range(5, 9))
    for a, b in zip(continued, original[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (name, a["step"])


def test_checkpoints_record_the_balance_loss_token_set(trained):
    root, _ = trained
    with open(os.path.join(root, "ep2", "checkpoints", "step_8", "meta.json")) as f:
        meta = json.load(f)
    assert meta["balance_loss"] == {"definition": "micro_batch", "micro_batch_size": 2}


@pytest.mark.parametrize("name,dp", [("from_old_dp2", 2), ("from_old_dp1", 1)])
def test_checkpoint_without_balance_record_resumes(trained, name, dp):
    """Written before the balance loss's token set was recorded: it resumes, with a warning where
    the old rule (each round of dp micro-batches together) took other token sets than now (dp>1),
    silently at dp=1, where it took the same ones. These steps 1-4 were trained per micro-batch, so
    the continuation matches the 1-process run."""
    root, results = trained
    result = results[name][0]
    assert result["start_step"] == 4
    warned = [w for w in result["warnings"] if "balance loss" in w]
    assert len(warned) == (dp > 1) and all(f"dp={dp}" in w for w in warned), warned
    continued, reference = rows(root, name), rows(root, "single")
    assert [r["step"] for r in continued] == list(range(5, 9))
    for a, b in zip(continued, reference[4:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (name, a["step"])


def read_checkpoint(path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path + ".pt"
    if not os.path.exists(out):
        dcp_to_torch_save(path, out)
    state = torch.load(out)
    return {k: v for k, v in state.items() if not k.endswith((".exp_avg", ".exp_avg_sq"))}


def test_exported_adapter_matches_distributed_model(trained):
    root, results = trained
    for name in ("ep2", "tp2ep2"):
        config = build_run_config(tiny_config(synthetic_dir(root), os.path.join(root, name)))
        hf = build_tiny_causal_lm(config.model.config, seed=config.train.seed)
        load_adapter(hf, os.path.join(root, name, "adapter")).eval()  # no adapter dropout
        with torch.no_grad():
            logits = hf(PROBE).logits
        distributed = results[name][0]["logits"]
        assert (logits - distributed).norm() / logits.norm() <= 1e-5, name


def test_incomplete_checkpoint_is_skipped(trained, tmp_path):
    root, _ = trained
    run_dir = os.path.join(root, "single")
    broken = os.path.join(run_dir, "checkpoints", "step_12")
    os.makedirs(broken)
    with open(os.path.join(broken, "__0_0.distcp"), "wb") as f:
        f.write(b"half-written")
    results = run_world(1, resume_single, root)[0]
    assert results["start_step"] == 8
    assert any("incomplete checkpoint" in w and "step_12" in w for w in results["warnings"])


def resume_single(root):
    hooks = Record()
    config = build_run_config(tiny_config(synthetic_dir(root), os.path.join(root, "single"), **PARITY,
                                          train=dict(steps=9)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(config, hooks)
    return {"start_step": hooks.start_step, "warnings": [str(w.message) for w in caught]}
