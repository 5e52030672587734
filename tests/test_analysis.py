"""The analysis command against independent computations: canonical correlations of matrices built
with known principal angles, spectra against numpy's SVD, on adapter files and on a checkpoint."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

from malora_dist.adapters.inject import adapter_layers, inject_adapters
from malora_dist.analysis.experts import analyse
from malora_dist.analysis.routing import summarise
from malora_dist.analysis.subspaces import canonical_correlations, cca_similarity, random_subspace_similarity
from malora_dist.commands.analyze import main
from malora_dist.config.adapter import AdapterConfig
from malora_dist.models import build_tiny_causal_lm
from malora_dist.parallel.adapter_files import save_adapter

TINY = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
            intermediate_size=48, vocab_size=64, max_position_embeddings=32)
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_tiny")


def test_canonical_correlations_are_the_cosines_of_the_principal_angles():
    theta = 0.7
    e = torch.eye(6, dtype=torch.float64)
    a = torch.stack([e[0], e[1]], dim=1)
    b = torch.stack([math.cos(theta) * e[0] + math.sin(theta) * e[2], e[1]], dim=1)
    mix = torch.tensor([[2.0, 1.0], [0.5, 3.0]], dtype=torch.float64)  # any basis of the same spaces
    got = canonical_correlations(a @ mix, b @ mix.t())
    torch.testing.assert_close(got, torch.tensor([1.0, math.cos(theta)], dtype=torch.float64))
    assert cca_similarity(a, b) == pytest.approx((1 + math.cos(theta)) / 2)
    assert cca_similarity(a, torch.zeros(6, 2)) is None


def _numpy_cca(x, y):
    """Mean canonical correlation of the column spaces, by numpy's QR (an independent route)."""
    qx, _ = np.linalg.qr(x)
    qy, _ = np.linalg.qr(y)
    return float(np.linalg.svd(qx.T @ qy, compute_uv=False).clip(max=1).mean())


def _saved_adapter(tmp_path, method):
    model = inject_adapters(build_tiny_causal_lm(TINY, seed=0),
                            AdapterConfig(method=method, rank=2, num_experts=4, top_k=2, lam=1.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for _, param in layer.adapter_tensors():
                param.copy_(torch.randn(param.shape, generator=gen))
    path = str(tmp_path / method)
    save_adapter(model, path, AdapterConfig(method=method, rank=2, num_experts=4, top_k=2, lam=1.0))
    return path, model


@pytest.mark.parametrize("method", ["malora", "molora", "lora"])
def test_analysis_of_adapter_files(tmp_path, method):
    path, model = _saved_adapter(tmp_path, method)
    out = str(tmp_path / "out")
    assert main([path, "--out", out, "--labels", method]) == 0
    written = json.load(open(os.path.join(out, "analysis.json")))
    result = written["runs"][method]
    expected_plots = ["cca.png", "spectra.png"] + ([] if method == "lora" else ["cca_summary.png"])
    assert written["plots"] == expected_plots  # matplotlib is in the [test] extra: the plots are drawn
    assert all(os.path.getsize(os.path.join(out, name)) > 1000 for name in expected_plots)
    name, layer = next(adapter_layers(model))
    tensors = {k: v.detach().double().numpy() for k, v in layer.adapter_tensors()}
    down = tensors["expert_down"]
    if method == "malora":
        down = np.einsum("erd,dn->ern", down, tensors["shared_A"])
    up = tensors["expert_up"]
    row = result["layers"][name]
    np.testing.assert_allclose(row["spectrum_down"]["singular_values"],
                               np.linalg.svd(np.concatenate(list(down), 0), compute_uv=False), rtol=1e-9)
    np.testing.assert_allclose(row["spectrum_up"]["singular_values"],
                               np.linalg.svd(np.concatenate(list(up), 1), compute_uv=False), rtol=1e-9)
    if method == "lora":
        assert row["cca_down"] is None and row["cca_up"] is None
        assert row["cca_down_random"] is None and row["cca_up_random"] is None
        return
    # the random baseline is drawn at the experts' shapes: rank-2 subspaces of the input / output space
    assert row["cca_down_random"] == random_subspace_similarity(down.shape[2], 2)
    assert row["cca_up_random"] == random_subspace_similarity(up.shape[1], 2)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    assert row["cca_down"]["mean"] == pytest.approx(np.mean([_numpy_cca(down[i].T, down[j].T) for i, j in pairs]))
    assert row["cca_up"]["mean"] == pytest.approx(np.mean([_numpy_cca(up[i], up[j]) for i, j in pairs]))
    assert set(result["by_projection"]) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}


def test_random_subspace_baseline_against_numpy():
    """The baseline against numpy's own draws and QR (an independent route); a subspace of the whole
    space has similarity 1 with any other."""
    rng = np.random.default_rng(11)
    for ambient, dim in ((64, 8), (16, 4)):
        draws = [_numpy_cca(rng.standard_normal((ambient, dim)), rng.standard_normal((ambient, dim)))
                 for _ in range(400)]
        assert random_subspace_similarity(ambient, dim) == pytest.approx(np.mean(draws), abs=0.02)
    assert random_subspace_similarity(6, 6) == pytest.approx(1.0)
    assert random_subspace_similarity(64, 8) < random_subspace_similarity(16, 4) < 1


def test_a_checkpoint_reads_as_its_adapter():
    from_checkpoint = analyse(os.path.join(FIXTURE, "checkpoints", "step_2"))
    from_adapter = analyse(os.path.join(FIXTURE, "adapter"))
    assert from_checkpoint["layers"] == from_adapter["layers"]
    assert all(layer["cca_down"]["mean"] is not None for layer in from_adapter["layers"].values())


def test_not_an_adapter_is_refused(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "neither an adapter directory" in capsys.readouterr().err


def test_routing_summary_of_known_loads():
    even, one, other = torch.ones(4), torch.tensor([8.0, 0, 0, 0]), torch.tensor([0, 0, 0, 8.0])
    summary = summarise({"a": {"l0": even, "l1": one}, "b": {"l0": even, "l1": other}})
    assert summary["tasks"]["a"]["l0"]["entropy"] == pytest.approx(1.0)
    assert summary["tasks"]["a"]["l1"]["entropy"] == pytest.approx(0.0)
    assert summary["task_distance"] == {"l0": pytest.approx(0.0), "l1": pytest.approx(1.0)}
    assert summary["mean_load"]["a"] == pytest.approx([0.625, 0.125, 0.125, 0.125])


def test_routing_by_task_counts_the_routers_choices(tmp_path):
    """The held-out pass through the run's model, against top-k of softmax(W_g x) computed here from
    the input of the first adapted layer (taken by a hook; fused or reference path alike)."""
    from malora_dist.adapters.layer import AdapterLinear
    from malora_dist.analysis.routing import routing_by_task

    seen = {}

    def record(layer, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        chosen = torch.softmax(x @ layer.router.weight.double().t(), dim=-1).topk(2, dim=-1).indices.reshape(-1)
        seen.setdefault("counts", torch.zeros(4, dtype=torch.float64))
        seen["counts"] += torch.bincount(chosen, minlength=4).double()

    original = AdapterLinear.__init__

    def hooked(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not seen.get("hooked"):
            seen["hooked"] = True
            self.register_forward_pre_hook(record)

    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    config = yaml.safe_load(open(run / "config.yaml"))
    for task in config["data"]["tasks"]:  # the synthetic tasks' own test splits as held-out sets
        task["eval_paths"] = task["paths"]
    yaml.safe_dump(config, open(run / "config.yaml", "w"))
    AdapterLinear.__init__ = hooked
    try:
        routing = routing_by_task(str(run / "adapter"), 3)
    finally:
        AdapterLinear.__init__ = original
    assert routing["examples_per_task"] == {"capitals": 3, "larger": 3, "parity": 3}
    tasks = routing["tasks"]
    pooled = {layer: torch.tensor([tasks[t][layer]["slots"] for t in tasks]).sum(0) for layer in tasks["capitals"]}
    assert any(torch.equal(c.double(), seen["counts"]) for c in pooled.values())
    assert len({float(c.sum()) for c in pooled.values()}) == 1  # every layer routes every token k times
    assert 0 <= routing["mean_task_distance"] <= 1
    out = str(tmp_path / "out")
    assert main([str(run / "adapter"), "--out", out, "--routing-examples", "2", "--labels", "tiny"]) == 0
    written = json.load(open(os.path.join(out, "analysis.json")))
    assert written["runs"]["tiny"]["routing"]["examples_per_task"]["parity"] == 2


def test_inputs_analysed_in_processes_of_their_own_give_the_same(tmp_path):
    paths = [_saved_adapter(tmp_path, method)[0] for method in ("malora", "molora")]
    outs = []
    for jobs in ("1", "2"):
        out = str(tmp_path / f"out{jobs}")
        assert main([*paths, "--out", out, "--labels", "a,b", "--jobs", jobs]) == 0
        outs.append(json.load(open(os.path.join(out, "analysis.json")))["runs"])
    assert outs[0] == outs[1]
    assert main([*paths, "--out", str(tmp_path / "o"), "--jobs", "0"]) == 2
