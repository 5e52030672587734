"""The adapter layer's parts on their own: layout-free dropout, the work counter behind the cost
model, and the notices for keys that have no effect."""

import pytest
import torch
import torch.nn as nn
from reference import adapter_params, dense_adapter_output, randomize_adapter_, rel_err

from malora_dist.adapters.cost import count_work
from malora_dist.adapters.dropout import DropoutContext, LayoutFreeDropout, keep_mask, set_dropout_context, token_places
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.config.adapter import AdapterConfig

P = 0.3


def context(places, step=3, seed=7):
    return DropoutContext(seed=seed, step=step, token_place=places)


def test_mask_keeps_one_minus_p_without_structure():
    mask = keep_mask(context(torch.arange(4096)), 11, range(64), P, "cpu").float()
    assert mask.mean().item() == pytest.approx(1 - P, abs=0.01)
    # no stripes: every token and every feature keeps about 1 − p of its entries
    assert mask.mean(0).sub(1 - P).abs().max() < 0.05 and mask[:1024].mean(1).std() < 0.07
    # neighbouring features and neighbouring tokens are not correlated
    for a, b in ((mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:])):
        assert (a * b).mean().item() == pytest.approx((1 - P) ** 2, abs=0.01)


def test_mask_is_a_function_of_place_and_feature_only():
    full = keep_mask(context(torch.arange(64)), 5, range(32), P, "cpu")
    # another rank holding tokens 40..63 draws their rows; a row-parallel shard draws its columns
    assert torch.equal(keep_mask(context(torch.arange(40, 64)), 5, range(32), P, "cpu"), full[40:])
    assert torch.equal(keep_mask(context(torch.arange(64)), 5, range(16, 32), P, "cpu"), full[:, 16:])
    # ... in any order of the tokens
    order = torch.randperm(64)
    assert torch.equal(keep_mask(context(order), 5, range(32), P, "cpu"), full[order])
    for other in (keep_mask(context(torch.arange(64), step=4), 5, range(32), P, "cpu"),
                  keep_mask(context(torch.arange(64), seed=8), 5, range(32), P, "cpu"),
                  keep_mask(context(torch.arange(64)), 6, range(32), P, "cpu")):
        assert not torch.equal(other, full)


def test_token_places_of_a_micro_batch():
    assert token_places(2, 2, 3).tolist() == [[6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("method,kernel,extra", [("malora", "dense", {}), ("malora", "sparse", {}),
                                                 ("molora", "sparse", {}), ("lora", "dense", {}),
                                                 ("malora", "dense", dict(shared_side="up")),
                                                 ("malora", "sparse", dict(shared_side="up"))])
def test_layer_applies_the_context_mask_to_the_adapter_input_only(method, kernel, extra):
    n, m, tokens = 16, 24, 12
    config = AdapterConfig(method=method, rank=4, num_experts=4, top_k=2 if method != "lora" else 1,
                           dropout=P, expert_kernel=kernel, **extra)
    layer = AdapterLinear(nn.Linear(n, m, bias=False), config, name="layers.0.q_proj")
    randomize_adapter_(layer, torch.Generator().manual_seed(1))
    x = torch.randn(2, tokens // 2, n, generator=torch.Generator().manual_seed(2))
    places = token_places(5, 2, tokens // 2)
    set_dropout_context(layer, context(places))
    out = layer(x)
    mask = keep_mask(context(places), layer.shared.dropout.layer_key, range(n), P, "cpu")
    flat = x.reshape(-1, n)
    ref = dense_adapter_output(flat, layer.base_layer.weight, adapter_params(layer), method, layer.top_k, False,
                               layer.scaling, dropped=flat * mask / (1 - P))
    assert rel_err(out.reshape(-1, m), ref) <= 1e-5
    layer.eval()
    plain = dense_adapter_output(flat, layer.base_layer.weight, adapter_params(layer), method, layer.top_k, False,
                                 layer.scaling)
    assert rel_err(layer(x).reshape(-1, m), plain) <= 1e-5


def test_context_of_another_batch_is_refused():
    dropout = LayoutFreeDropout(P, "q_proj")
    dropout.context = context(torch.arange(10))
    with pytest.raises(ValueError, match="places 10 tokens"):
        dropout(torch.ones(12, 4))


def test_work_counter_counts_ops_flops_and_bytes():
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(16, 4)
    terms = count_work(lambda: (a @ b).mul(2.0).sum().backward())
    # forward: mm (2·8·16·4 FLOPs), mul, sum; backward: the gradient of sum and mul, and one mm for a
    assert terms.flops == 2 * (2 * 8 * 16 * 4)
    assert terms.ops >= 5 and terms.copy_bytes > 0


def test_keys_without_effect_are_named():
    lora = AdapterConfig(method="lora", num_experts=4, lam=1.0)
    notes = lora.ineffective_keys()
    assert any("adapter.num_experts" in n for n in notes) and any("adapter.lam" in n for n in notes)
    assert AdapterConfig(method="malora").ineffective_keys() == []
    split = AdapterConfig(method="molora", expert_kernel="dense").ineffective_keys(experts_split=True)
    assert len(split) == 1 and "expert_kernel=dense" in split[0]
