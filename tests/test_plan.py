"""The planner against real builds and a real run: per-rank memory of the meta-device build under a
fake process group equals what a gloo world of the same layout allocates, and the step-time model,
given this machine's measured link and compute, predicts the measured step within a stated band.

One gloo world per world size (2: ep = 2; 4: tp = 2, ep = 2), several checks inside each.
"""

import pytest
from world import run_world

from malora_dist.plan.fake_world import distinct_positions, fake_rank
from malora_dist.plan.machine import PRESETS, load_machine
from malora_dist.plan.measure import calibrated_machine, measured_run
from malora_dist.plan.planner import candidate_layouts, plan_layout
from malora_dist.plan.rank_build import plan_run_config

TINY = "configs/tiny.yaml"
LAYOUTS = {2: ["parallel.ep=2"], 4: ["parallel.ep=2", "parallel.tp=2"]}
STATIC = ("frozen_bytes", "trainable_bytes", "gradient_bytes", "optimizer_bytes")
# The planner counts saved activations with attention in its math form and the experts local (see
# plan/rank_build.py); on the tiny model the count is 10 % under what the real run saves (27.0 MB
# planned, 29.9 MB measured at ep = 2).
ACTIVATION_TOLERANCE = 0.15
# The step-time band. The model prices every ATen op at its roofline plus a per-op cost measured on a
# small autograd chain, with the link and rates measured while the ranks run. Over the runs of
# benchmarks/README.md ("Planning") the step's error went from -68 % (-3.1x) to +66 % (4 processes
# on 2 cores); the 2 cores are shared with other jobs, and the same tiny run measured 0.59 s per step
# at load average 4 and 1.72 s at 35, where the calibration and the steps saw different loads. The
# band, a factor of 5 below and 2 above, holds the model to the right order with room for that.
STEP_BAND = (1 / 5, 2.0)


def _calibrate_and_run(overrides):
    return calibrated_machine(), measured_run(TINY, overrides, steps=2)


@pytest.fixture(scope="module")
def worlds():
    return {size: run_world(size, _calibrate_and_run, overrides) for size, overrides in LAYOUTS.items()}


@pytest.mark.slow  # multi-process worlds
@pytest.mark.parametrize("size", sorted(LAYOUTS))
def test_planned_memory_is_what_a_real_build_allocates(worlds, size):
    machine = worlds[size][0][0]
    plan = plan_layout(plan_run_config(TINY, LAYOUTS[size]), size, machine)
    assert plan.error is None
    tp = 2 if size == 4 else 1
    ep = 2
    for _, measured in worlds[size]:
        rank = measured["rank"]
        position = next(first for first in plan.memory
                        if (first % tp, (first // tp) % ep) == (rank % tp, (rank // tp) % ep))
        planned = plan.memory[position]
        for key in STATIC:
            assert getattr(planned, key) == measured[key], (rank, key)
        assert planned.activation_bytes == pytest.approx(measured["activation_bytes"], rel=ACTIVATION_TOLERANCE)


@pytest.mark.slow  # multi-process worlds
def test_predicted_step_is_within_the_band_of_the_measured_one(worlds):
    machine, measured = worlds[2][0]
    plan = plan_layout(plan_run_config(TINY, LAYOUTS[2]), 2, machine)
    ratio = plan.prediction.step_s / measured["times"]["step_s"]
    assert STEP_BAND[0] <= ratio <= STEP_BAND[1], ratio


def test_positions_match_the_groups_megatron_builds():
    for rank, _ in distinct_positions(8, 2, 2).items():
        with fake_rank(8, rank, 2, 2, 4) as groups:
            assert (groups.tp_rank, groups.ep_rank) == (rank % 2, (rank // 2) % 2)
    assert sum(distinct_positions(8, 2, 2).values()) == 8


def test_errors_a_launch_would_hit_appear_in_the_plan():
    machine = PRESETS["h100"]
    heads = plan_layout(plan_run_config(TINY, ["parallel.tp=8"]), 8, machine)
    assert "tp=8" in heads.error and "num_attention_heads=4" in heads.error
    experts = plan_layout(plan_run_config(TINY, ["parallel.ep=8", "train.global_batch_size=16"]), 8, machine)
    assert "adapter.num_experts=4" in experts.error
    assert (8, 1, "ep") not in candidate_layouts(plan_run_config(TINY), 4)


def test_a_machine_file_with_a_wrong_key_names_it(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("name: x\npeak_flop: 1\n")
    with pytest.raises(ValueError, match="peak_flop"):
        load_machine(str(path))


def test_the_plan_command_ranks_layouts_against_the_memory_given(tmp_path, capsys):
    """``launch/plan.py``'s flags: ``--all-layouts`` ranks every layout of the world, ``--machine``
    and ``--gpu-memory-gib`` set what a rank holds (a tiny budget: nothing fits), ``--json`` writes
    the plans; a bad world size is one line and exit 2."""
    import json

    from malora_dist.commands.plan import main

    out = tmp_path / "plan.json"
    assert main(["--config", TINY, "--world-size", "2", "--all-layouts", "--machine", "h200",
                 "--gpu-memory-gib", "0.001", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "H200" in printed and "DOES NOT FIT" in printed
    plans = json.loads(out.read_text())
    layouts = {(p["tp"], p["ep"], p["placement"]) for p in plans}
    assert len(plans) == len(layouts) == len(candidate_layouts(plan_run_config(TINY), 2)) >= 2
    assert all(p["error"] is None and p["peak_bytes"] > 0.001 * 2**30 for p in plans)
    assert main(["--config", TINY, "--world-size", "0"]) == 2
    assert "--world-size" in capsys.readouterr().err
