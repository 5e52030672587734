"""``analysis --delta``: the step-0 values recomputed from the run's seed, against the trainer's own
build of the adapters (an untrained adapter changed by exactly nothing) and the learned change of
the trained runs against numpy on trained − step-0 tensors."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from malora_dist.analysis.subspaces import random_subspace_similarity
from malora_dist.commands.analyze import main
from malora_dist.config.run import load_run_config
from malora_dist.models import build_tiny_causal_lm
from malora_dist.parallel.adapter_files import read_adapter_state, save_adapter
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.runtime.groups import ParallelGroups

RUNS = ("malora_ep2", "molora_ep2", "lora_dp2")  # training_support.TRAINED_RUNS


def _step_zero_run(run_dir, out_dir, seed_override=None):
    """A copy of a trained run whose adapter is the trainer's step-0 build of its config (the base
    and adapters built as ``train.build`` builds them, one process): what training started from."""
    config = load_run_config(os.path.join(run_dir, "config.yaml"))
    model = build_tiny_causal_lm(config.model.config, seed=config.train.seed, dtype=torch.float32)
    build_adapters(model, config.adapter, ParallelGroups.single(), seed=config.train.seed)
    os.makedirs(out_dir)
    shutil.copy(os.path.join(run_dir, "config.yaml"), out_dir)
    save_adapter(model, os.path.join(out_dir, "adapter"), config.adapter)
    return os.path.join(out_dir, "adapter")


def _analyse(tmp_path, adapter, *extra):
    out = str(tmp_path / "analysis")
    assert main([adapter, "--out", out, "--delta", "--labels", "x", *extra]) == 0
    with open(os.path.join(out, "analysis.json")) as f:
        return json.load(f)["runs"]["x"], out


@pytest.mark.slow  # the trained_runs fixture: a 2-process world
@pytest.mark.parametrize("run", RUNS)
def test_an_untrained_adapter_changed_by_exactly_nothing(trained_runs, tmp_path, run):
    adapter = _step_zero_run(os.path.join(trained_runs, run), str(tmp_path / "run"))
    result, _ = _analyse(tmp_path, adapter)
    change = result["delta"]
    assert change["seed"] == 0 and change["max_abs_change"] == 0.0
    for layer in change["layers"].values():
        assert max(layer["spectrum_down"]["singular_values"]) == 0.0
        assert max(layer["spectrum_up"]["singular_values"]) == 0.0
        assert layer["cca_down"] is None or layer["cca_down"]["mean"] is None  # zero matrices span nothing
        assert layer["change_down"] == 0.0 and layer["change_up"] is None  # the up side starts at zero


@pytest.mark.slow  # the trained_runs fixture: a 2-process world
def test_the_seed_decides_the_start(trained_runs, tmp_path):
    """Against another seed's start the same untrained adapter differs by two independent draws:
    ‖A − A'‖ / ‖A'‖ ≈ √2 (what an adapter analysed against the wrong start shows)."""
    adapter = _step_zero_run(os.path.join(trained_runs, "molora_ep2"), str(tmp_path / "run"))
    result, _ = _analyse(tmp_path, adapter, "--seed", "1")
    assert result["delta"]["seed"] == 1 and result["delta"]["max_abs_change"] > 0
    for layer in result["delta"]["layers"].values():
        assert layer["change_down"] == pytest.approx(math.sqrt(2), rel=0.15)


def _numpy_cca(x, y):
    qx, _ = np.linalg.qr(x)
    qy, _ = np.linalg.qr(y)
    return float(np.linalg.svd(qx.T @ qy, compute_uv=False).clip(max=1).mean())


def _expert_matrices(state, name, method):
    """(down_t, up_t, P_t or None) per expert of one layer, as numpy float64, from checkpoint keys."""
    if method == "lora":
        prefix = f"base_model.model.{name}"
        down, up = state[f"{prefix}.lora_A.weight"], state[f"{prefix}.lora_B.weight"]
        return [down.double().numpy()], [up.double().numpy()], None
    coefficients = [state[f"{name}.experts.{t}.down"].double().numpy() for t in range(4)]
    up = [state[f"{name}.experts.{t}.up"].double().numpy() for t in range(4)]
    if f"{name}.shared_A" in state:
        return [p @ state[f"{name}.shared_A"].double().numpy() for p in coefficients], up, coefficients
    return coefficients, up, None


@pytest.mark.slow  # the trained_runs fixture: a 2-process world
@pytest.mark.parametrize("run", RUNS)
def test_the_learned_change_of_a_trained_run(trained_runs, tmp_path, run):
    """Trained at ep=2 (each rank built only its experts) or dp=2: the change is trained − the
    one-process step-0 build, layer by layer, for the product P_t S_A and for P_t itself."""
    run_dir = os.path.join(trained_runs, run)
    start, _ = read_adapter_state(_step_zero_run(run_dir, str(tmp_path / "start")))
    trained, config = read_adapter_state(os.path.join(run_dir, "adapter"))
    result, out = _analyse(tmp_path, os.path.join(run_dir, "adapter"))
    change = result["delta"]
    assert change["max_abs_change"] > 0
    method = config.method
    for name, layer in change["layers"].items():
        down, up, coefficients = _expert_matrices(trained, name, method)
        down0, up0, coefficients0 = _expert_matrices(start, name, method)
        d_down = [a - b for a, b in zip(down, down0)]
        d_up = [a - b for a, b in zip(up, up0)]
        np.testing.assert_allclose(layer["spectrum_down"]["singular_values"],
                                   np.linalg.svd(np.concatenate(d_down, 0), compute_uv=False), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer["spectrum_up"]["singular_values"],
                                   np.linalg.svd(np.concatenate(d_up, 1), compute_uv=False), rtol=1e-9, atol=1e-12)
        moved = np.sqrt(sum((d ** 2).sum() for d in d_down) / sum((d ** 2).sum() for d in down0))
        assert layer["change_down"] == pytest.approx(moved)
        assert 0 < layer["change_down"] < 0.5  # a few steps from the very start this run had
        if method == "lora":
            assert layer["cca_down"] is None
            continue
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        expected_down = np.mean([_numpy_cca(d_down[i].T, d_down[j].T) for i, j in pairs])
        assert layer["cca_down"]["mean"] == pytest.approx(expected_down)
        assert layer["cca_up"]["mean"] == pytest.approx(np.mean([_numpy_cca(d_up[i], d_up[j]) for i, j in pairs]))
        assert layer["cca_down_random"] == random_subspace_similarity(down[0].shape[1], min(down[0].shape))
        if method == "malora":
            d_p = [a - b for a, b in zip(coefficients, coefficients0)]
            assert layer["cca_coefficients"]["mean"] == pytest.approx(
                np.mean([_numpy_cca(d_p[i].T, d_p[j].T) for i, j in pairs]))
            assert layer["cca_coefficients_random"] == random_subspace_similarity(d_p[0].shape[1], d_p[0].shape[0])
            assert layer["change_shared"] > 0
    written = json.load(open(os.path.join(out, "summary.json")))["runs"]["x"]
    assert "layers" not in written["delta"] and set(written["delta"]["by_projection"]) == set(result["by_projection"])
    assert "Learned change" in open(os.path.join(out, "tables.md")).read()
    if method != "lora":
        for name in ("cca_delta.png", "spectra_delta.png", "cca_summary_delta.png"):
            assert os.path.getsize(os.path.join(out, name)) > 1000


@pytest.mark.slow  # the trained_runs fixture: a 2-process world
def test_a_checkpoint_reads_its_seed_from_its_run(trained_runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(os.path.join(trained_runs, "molora_ep2"), run_dir)
    config = yaml.safe_load(open(run_dir / "config.yaml"))
    config["train"]["seed"] = 5  # the run's config decides the start: another seed, another start
    yaml.safe_dump(config, open(run_dir / "config.yaml", "w"))
    checkpoint = sorted(os.listdir(run_dir / "checkpoints"))[-1]
    result, _ = _analyse(tmp_path, str(run_dir / "checkpoints" / checkpoint))
    assert result["delta"]["seed"] == 5


@pytest.mark.slow  # the trained_runs fixture: a 2-process world
def test_delta_needs_a_seed(tmp_path, capsys, trained_runs):
    adapter = tmp_path / "adapter"
    shutil.copytree(os.path.join(trained_runs, "molora_ep2", "adapter"), adapter)
    assert main([str(adapter), "--out", str(tmp_path / "o"), "--delta"]) == 2
    assert "--seed" in capsys.readouterr().err
    assert main([str(adapter), "--out", str(tmp_path / "o"), "--seed", "0"]) == 2
    assert "pass --delta" in capsys.readouterr().err


VARIANTS = {
    "lora-dora": dict(method="lora", rank=2, dora=True),
    "hydralora": dict(method="hydralora", rank=2, num_experts=4, top_k=2),
    "malora-per-expert": dict(method="malora", rank=2, num_experts=4, top_k=2, lam=1.0, subspace="per_expert"),
    "malora-shared-up": dict(method="malora", rank=2, num_experts=4, top_k=2, lam=1.0, shared_side="up"),
    "molora-identical": dict(method="molora", rank=2, num_experts=4, top_k=2, identical_init=True),
    "malora-frozen-down": dict(method="malora", rank=2, num_experts=4, top_k=2, lam=1.0, beta=2.0,
                               freeze=["expert_down"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_starts_where_it_is_recomputed(tmp_path, variant):
    """The recomputed start of each layer variant equals its freshly built tensors exactly (DoRA's
    magnitude, a function of the base weights, aside)."""
    from malora_dist.adapters.inject import inject_adapters
    from malora_dist.analysis.initial_state import initial_adapter_state
    from malora_dist.config.adapter import AdapterConfig

    config = AdapterConfig(**VARIANTS[variant])
    tiny = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=48, vocab_size=64, max_position_embeddings=32)
    model = inject_adapters(build_tiny_causal_lm(tiny, seed=0), config, seed=7)
    save_adapter(model, str(tmp_path / "adapter"), config)
    state, read_config = read_adapter_state(str(tmp_path / "adapter"))
    initial = initial_adapter_state(state, read_config, 7)
    assert set(state) - set(initial) == ({k for k in state if k.endswith("magnitude_vector")} if config.dora else set())
    for key, value in initial.items():
        assert torch.equal(value, state[key]), key
    assert any(not torch.equal(v, state[k]) for k, v in initial_adapter_state(state, read_config, 8).items())
