"""Adapters on the tensor-parallel base (tp=2, and tp=2 × ep=2 on 4 ranks) against the
single-process reference: the unsharded Hugging Face model with the same adapters.

The reference and every layout hold the same full adapter tensors (random, so B̄ ≠ 0 and every
gradient path is exercised). Each layout runs its share of the global batch; its loss is the summed
token loss over the global token count plus the balance loss, its gradients are summed by the
reduction rules, gathered to full tensors and compared with the reference gradients.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from malora_dist.adapters.config import AdapterConfig
from malora_dist.adapters.inject import adapter_layers, adapter_parameters, auxiliary_loss, inject_adapters
from malora_dist.adapters.io import adapter_state, load_adapter_state
from malora_dist.models import build_tiny_causal_lm, shard_causal_lm
from malora_dist.parallel.gradients import global_grad_norm, reduce_gradients
from malora_dist.parallel.groups import ParallelGroups
from malora_dist.parallel.parallelize import parallelize_adapters
from malora_dist.parallel.sharding import full_tensor
from reference import rel_err
from world import run_world

pytestmark = pytest.mark.slow  # multi-process worlds (the fast tier: pytest -m "not slow")

MODEL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=64, vocab_size=128, max_position_embeddings=32, tie_word_embeddings=True)
ADAPTERS = {
    "malora": dict(method="malora", rank=2, num_experts=4, top_k=2, balance_loss_coef=0.1),
    "molora": dict(method="molora", rank=2, num_experts=4, top_k=2, balance_loss_coef=0.1),
    "lora": dict(method="lora", rank=4),
}
BATCH, SEQ = 4, 8


@dataclass(frozen=True)
class Layout:
    tp: int
    ep: int
    world: int


LAYOUTS = {"tp2": Layout(2, 1, 2), "tp2xep2": Layout(2, 2, 4), "tp2xdp2": Layout(2, 1, 4)}
CASES = [(m, l) for m in ADAPTERS for l in LAYOUTS if not (m == "lora" and LAYOUTS[l].ep > 1)]


def reference_model(method):
    model = build_tiny_causal_lm(MODEL, seed=0)
    torch.manual_seed(1)
    inject_adapters(model, AdapterConfig(**ADAPTERS[method]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that carries no loss
    labels[0, 5:] = -100  # and uneven loss-token counts per sequence
    return ids, labels


def reference_run(method):
    model = reference_model(method)
    ids, labels = batch()
    logits = model(ids).logits
    token_losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum")
    loss = token_losses / (labels[:, 1:] != -100).sum() + auxiliary_loss(model)
    loss.backward()
    grads = {}
    for name, layer in adapter_layers(model):
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                grads[f"{name}.{pname}"] = p.grad.clone()
    return model, loss.item(), grads


def layout_run(method, layout_name, groups):
    ref_model, ref_loss, ref_grads = reference_run(method)
    model = shard_causal_lm(build_tiny_causal_lm(MODEL, seed=0), groups)
    torch.manual_seed(1)
    inject_adapters(model, AdapterConfig(**ADAPTERS[method]))
    parallelize_adapters(model, groups)
    load_adapter_state(model, adapter_state(ref_model), groups)

    ids, labels = batch()
    share = BATCH // groups.dp
    mine = slice(groups.dp_rank * share, (groups.dp_rank + 1) * share)
    global_tokens = (labels[:, 1:] != -100).sum()
    token_losses = model.token_losses(model(ids[mine]), labels[mine])
    loss = token_losses.sum() / global_tokens + auxiliary_loss(model)
    loss.backward()
    params = adapter_parameters(model)
    reduce_gradients(params, groups)
    total_loss = loss.detach().clone()
    if groups.dp_group is not None:
        dist.all_reduce(total_loss, group=groups.dp_group)
    errors = {}
    for name, layer in adapter_layers(model):
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                errors[f"{name}.{pname}"] = rel_err(full_tensor(p, groups, p.grad), ref_grads[f"{name}.{pname}"])
    ref_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()
    return {"loss": (total_loss.item(), ref_loss), "grads": errors,
            "grad_norm": (global_grad_norm(params, groups).item(), ref_norm)}


def world_main(cases):
    results = {}
    for method, layout_name in cases:
        layout = LAYOUTS[layout_name]
        groups = ParallelGroups.build(tp=layout.tp, ep=layout.ep)
        results[(method, layout_name)] = layout_run(method, layout_name, groups)
    return results


@pytest.fixture(scope="module")
def results():
    out = {}
    for world in sorted({l.world for l in LAYOUTS.values()}):
        cases = [c for c in CASES if LAYOUTS[c[1]].world == world]
        per_rank = run_world(world, world_main, cases)
        for case in cases:
            out[case] = [r[case] for r in per_rank]
    return out


@pytest.mark.parametrize("method,layout", CASES)
def test_adapter_gradients_match_single_process_hf_model(results, method, layout):
    for rank, result in enumerate(results[(method, layout)]):
        loss, ref_loss = result["loss"]
        assert loss == pytest.approx(ref_loss, rel=1e-5), rank
        norm, ref_norm = result["grad_norm"]
        assert norm == pytest.approx(ref_norm, rel=1e-5), rank
        assert len(result["grads"]) > 0
        for name, err in result["grads"].items():
            assert err <= 1e-5, (rank, name, err)
