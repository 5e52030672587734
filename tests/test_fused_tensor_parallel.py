"""The fused kernels on a tensor-parallel base and with experts split over ranks against the
reference parts, in fp64.

Real gloo worlds — tp=2 (2 processes), ep=2 (2), tp=2×ep=2 (4) — build a tiny LLaMA twice with the
same adapter values, once with ``adapter.kernel: auto`` (the fused Function of the whole layer on
column- and row-parallel bases; with experts split over ranks, the fused routing and grouped-experts
Functions around the all-to-all, siblings sharing one exchange) and once with ``reference`` (the
parts, with megatron's mappings between the products), run one micro-batch forward and backward with
dropout 0.05 from the layout-free context, the balance loss and the z-loss, and compare the logits,
the loss and every adapter gradient (this rank's slices and experts). The targets hold column bases
(q, k, v, gate, up) and row bases (o, down). Both kernels are also held against the unsharded model
by ``tests/test_tp_adapters.py`` and ``tests/test_expert_parallel.py``.
"""

from __future__ import annotations

import pytest
import torch
from reference import rel_err
from world import run_world

from malora_dist.adapters.dropout import DropoutContext, set_dropout_context, token_places
from malora_dist.adapters.inject import adapter_layers, adapter_parameters, auxiliary_loss, inject_adapters
from malora_dist.config.adapter import AdapterConfig
from malora_dist.models import build_tiny_causal_lm, shard_causal_lm
from malora_dist.parallel.adapter_files import adapter_state, load_adapter_state
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.runtime.groups import ParallelGroups

pytestmark = pytest.mark.slow  # a multi-process world

MODEL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=48, vocab_size=64, max_position_embeddings=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "malora": dict(method="malora", rank=2, num_experts=4, top_k=2),
    "molora": dict(method="molora", rank=2, num_experts=4, top_k=2),
    "lora": dict(method="lora", rank=4),
}
ROWS, SEQ = 2, 8


def adapter_config(method: str, kernel: str) -> AdapterConfig:
    return AdapterConfig(**METHODS[method], dropout=0.05, balance_loss_coef=0.01, router_z_loss_coef=0.001,
                         target_modules=TARGETS, kernel=kernel)


def full_values(method: str) -> dict:
    """Random full adapter tensors (B ≠ 0), from a one-process build."""
    base = build_tiny_causal_lm(MODEL, seed=0, dtype=torch.float64)
    model = inject_adapters(base, adapter_config(method, "reference"))
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return adapter_state(model)


def run(method: str, kernel: str, groups, values: dict) -> dict:
    model = shard_causal_lm(build_tiny_causal_lm(MODEL, seed=0, dtype=torch.float64), groups)
    build_adapters(model, adapter_config(method, kernel), groups)
    load_adapter_state(model, values, groups)
    fused = [name for name, layer in adapter_layers(model) if layer.fused]
    split = [name for name, layer in adapter_layers(model) if layer.fused_route is not None]
    model.train()
    set_dropout_context(model, DropoutContext(seed=1, step=2, token_place=token_places(0, ROWS, SEQ)))
    ids = torch.randint(0, MODEL["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(7))
    logits = model(ids)
    loss = model.token_losses(logits, ids).sum() / ids.numel() + auxiliary_loss(model)
    loss.backward()
    grads = {f"{name}.{part}": p.grad.clone() for name, layer in adapter_layers(model)
             for part, p in layer.adapter_tensors() if p.grad is not None}
    exchanges = sum(layer.traffic.exchanges for _, layer in adapter_layers(model))
    return {"logits": model.gather_logits(logits).detach(), "loss": loss.item(), "grads": grads, "fused": fused,
            "grouped": split, "exchanges": exchanges, "layers": len(list(adapter_layers(model)))}


def _world(tp: int, ep: int):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the adapters' dtype
    try:
        groups = ParallelGroups.build(tp=tp, ep=ep)
        results = {}
        for method in METHODS:
            values = full_values(method)
            results[method] = {kernel: run(method, kernel, groups, values) for kernel in ("auto", "reference")}
        groups.destroy()
        return results
    finally:
        torch.set_default_dtype(default)


LAYOUTS = {"tp2": (2, 1), "ep2": (1, 2), "tp2_ep2": (2, 2)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_world(request):
    tp, ep = LAYOUTS[request.param]
    return request.param, run_world(tp * ep, _world, tp, ep)


@pytest.mark.parametrize("method", METHODS)
def test_auto_runs_fused_kernels_at_every_layout(layout_world, method):
    name, world = layout_world
    for result in world:
        fused, reference = result[method]["auto"], result[method]["reference"]
        assert len(fused["fused"]) == fused["layers"] == 2 * len(TARGETS) and reference["fused"] == []
        split = LAYOUTS[name][1] > 1 and method != "lora"  # LoRA's one expert is never split
        # experts split over ranks: every layer routes and runs its experts in the grouped Functions
        assert len(fused["grouped"]) == (fused["layers"] if split else 0)
        # siblings share an exchange on both paths: q/k/v, o, gate/up, down per block
        assert fused["exchanges"] == reference["exchanges"] == (4 * MODEL["num_hidden_layers"] if split else 0)


@pytest.mark.parametrize("method", METHODS)
def test_fused_equals_reference_parts_at_every_layout(layout_world, method):
    name, world = layout_world
    for rank, result in enumerate(world):
        fused, reference = result[method]["auto"], result[method]["reference"]
        assert rel_err(fused["logits"], reference["logits"]) <= 1e-12, (name, rank)
        assert fused["loss"] == pytest.approx(reference["loss"], rel=1e-12)
        assert fused["grads"].keys() == reference["grads"].keys() and fused["grads"]
        for key, grad in reference["grads"].items():
            assert rel_err(fused["grads"][key], grad) <= 1e-10, (name, rank, key, rel_err(fused["grads"][key], grad))
