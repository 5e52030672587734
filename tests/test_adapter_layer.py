"""The adapter layer against the independent dense reference, its initialisation and its router losses."""

import itertools

import pytest
import torch
import torch.nn as nn
from reference import adapter_params, dense_adapter_output, randomize_adapter_, rel_err

from malora_dist.adapters.gating import balance_loss, plan_slots
from malora_dist.adapters.inject import auxiliary_loss
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.config.adapter import AdapterConfig

SHAPES = [  # (n, m, rank, num_experts, tokens)
    (16, 24, 4, 4, 13),
    (40, 8, 2, 4, 7),
    (24, 24, 2, 8, 33),
]
CASES = [
    (method, shape, top_k, normalize, kernel)
    for method, shape, top_k, normalize, kernel in itertools.product(
        ("malora", "molora", "lora"), SHAPES, (1, 2), (False, True), ("sparse", "dense"))
    if not (method == "lora" and (top_k == 2 or normalize or kernel == "dense"))
]


def make_layer(method, n, m, rank, num_experts, top_k, normalize=False, seed=0, **extra):
    torch.manual_seed(seed)  # the base's weight
    config = AdapterConfig(method=method, rank=rank, num_experts=num_experts, top_k=top_k,
                           normalize_gates=normalize, **extra)
    return AdapterLinear(nn.Linear(n, m, bias=False), config, name="layer", seed=seed)


@pytest.mark.parametrize("method,shape,top_k,normalize,kernel", CASES)
def test_forward_and_gradients_match_dense_reference(method, shape, top_k, normalize, kernel):
    n, m, rank, num_experts, tokens = shape
    layer = make_layer(method, n, m, rank, num_experts, top_k, normalize, expert_kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    randomize_adapter_(layer, gen)
    x = torch.randn(tokens, n, generator=gen, requires_grad=True)
    grad_out = torch.randn(tokens, m, generator=gen)

    out = layer(x)
    (out * grad_out).sum().backward()

    ref_params = {k: v.detach().clone().requires_grad_() for k, v in adapter_params(layer).items()}
    ref_x = x.detach().clone().requires_grad_()
    ref = dense_adapter_output(ref_x, layer.base_layer.weight, ref_params, method, top_k, normalize, layer.scaling)
    (ref * grad_out).sum().backward()

    assert rel_err(out, ref) <= 1e-5
    assert rel_err(x.grad, ref_x.grad) <= 1e-5
    for name, param in adapter_params(layer).items():
        assert param.grad is not None, name
        if name == "router.weight" and normalize and top_k == 1:
            # A single renormalised gate is 1 whatever the logits: the true gradient is zero, and
            # both sides hold only rounding noise.
            assert param.grad.norm() < 1e-4 and ref_params[name].grad.norm() < 1e-4
            continue
        assert rel_err(param.grad, ref_params[name].grad) <= 1e-5, name


@pytest.mark.parametrize("method,kernel", [("malora", "sparse"), ("malora", "dense"), ("molora", "sparse"),
                                           ("molora", "dense"), ("lora", "sparse")])
@pytest.mark.parametrize("training", [True, False])
def test_dropout_reaches_the_adapter_input_only(method, kernel, training):
    """Training: the router and the base see x, the adapter sees drop(x); eval: no dropout at all."""
    n, m, rank, num_experts, tokens = 16, 24, 4, 4, 13
    layer = make_layer(method, n, m, rank, num_experts, 2 if method != "lora" else 1,
                       expert_kernel=kernel, dropout=0.3)
    layer.train(training)
    gen = torch.Generator().manual_seed(1)
    randomize_adapter_(layer, gen)
    x = torch.randn(tokens, n, generator=gen, requires_grad=True)
    grad_out = torch.randn(tokens, m, generator=gen)
    torch.manual_seed(123)
    out = layer(x)
    (out * grad_out).sum().backward()

    torch.manual_seed(123)  # the layer's only random draw is its dropout mask
    mask = torch.nn.functional.dropout(torch.ones(tokens, n), 0.3, training=training)
    assert training == bool((mask == 0).any())
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in adapter_params(layer).items()}
    ref_x = x.detach().clone().requires_grad_()
    ref = dense_adapter_output(ref_x, layer.base_layer.weight, ref_params, method, layer.top_k, False,
                               layer.scaling, dropped=ref_x * mask)
    (ref * grad_out).sum().backward()
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(x.grad, ref_x.grad) <= 1e-5
    for name, param in adapter_params(layer).items():
        assert rel_err(param.grad, ref_params[name].grad) <= 1e-5, name


def test_leading_dims_are_kept():
    layer = make_layer("malora", 16, 24, 4, 4, 2)
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 24)


@pytest.mark.parametrize("method", ["malora", "molora", "lora"])
def test_output_is_exactly_the_base_at_step_zero(method):
    layer = make_layer(method, 16, 24, 4, 4, 2)
    x = torch.randn(9, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_malora_init_shapes_and_beta():
    one = make_layer("malora", 32, 20, 4, 4, 2, beta=1.0, seed=3)
    other = make_layer("malora", 32, 20, 4, 4, 2, beta=1.25, seed=3)
    cfg = one.config
    assert one.shared_A.shape == (cfg.d, 32) and one.expert_down.shape == (4, cfg.r_bar, cfg.d)
    assert one.expert_up.shape == (4, 20, cfg.r_bar) and torch.count_nonzero(one.expert_up) == 0
    # P_t S_A does not depend on β; S_A S_Aᵀ = β² I.
    torch.testing.assert_close(one.expert_down @ one.shared_A, other.expert_down @ other.shared_A, rtol=1e-5, atol=1e-6)
    for layer, beta in ((one, 1.0), (other, 1.25)):
        gram = layer.shared_A @ layer.shared_A.t()
        torch.testing.assert_close(gram, beta**2 * torch.eye(cfg.d), rtol=0, atol=1e-5)
    assert not torch.allclose(one.shared_A, other.shared_A)
    # P_0 S_A = (U_0 Σ_0)[:r̄] V_0 is the first r̄ rows of K_0, a Kaiming-uniform draw: inside U(±1/√n).
    assert (one.expert_down[0] @ one.shared_A).abs().max() <= 1.0 / 32**0.5 + 1e-6


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_malora_gradients_at_step_zero(kernel):
    layer = make_layer("malora", 32, 20, 4, 4, 1, seed=5, expert_kernel=kernel)
    x = torch.randn(64, 32)
    layer(x).pow(2).sum().backward()  # non-zero upstream gradient
    (layer(x) * torch.randn(64, 20)).sum().backward()
    assert torch.count_nonzero(layer.shared_A.grad) == 0
    assert torch.count_nonzero(layer.expert_down.grad) == 0
    routed = torch.bincount(torch.topk(x @ layer.router.weight.t(), 1).indices.reshape(-1), minlength=4)
    for t in range(4):
        assert (torch.count_nonzero(layer.expert_up.grad[t]) > 0) == bool(routed[t] > 0), t
    assert routed.sum() == 64


def test_balance_loss_on_hand_built_routings():
    num_experts, tokens = 4, 8
    uniform = torch.full((tokens, num_experts), 1.0 / num_experts)
    round_robin = torch.arange(tokens * 2).reshape(tokens, 2) % num_experts
    counts = torch.bincount(round_robin.reshape(-1), minlength=num_experts).float()
    loss = balance_loss(uniform.sum(0), counts, torch.tensor(float(tokens)), top_k=2)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)

    one_hot = torch.zeros(tokens, num_experts)
    one_hot[:, 2] = 1.0
    all_on_two = torch.full((tokens, 1), 2)
    counts = torch.bincount(all_on_two.reshape(-1), minlength=num_experts).float()
    loss = balance_loss(one_hot.sum(0), counts, torch.tensor(float(tokens)), top_k=1)
    assert loss.item() == pytest.approx(num_experts, abs=1e-6)


def test_auxiliary_loss_of_collapsed_router_is_n_times_coefficient():
    layer = make_layer("malora", 16, 16, 4, 4, 1, balance_loss_coef=0.01)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1] = 100.0
    model = nn.Sequential(layer)
    model(torch.ones(5, 16))
    assert auxiliary_loss(model).item() == pytest.approx(4 * 0.01, rel=1e-5)
    assert layer.expert_load.tolist() == [0, 5, 0, 0]


def test_router_z_loss_enters_the_auxiliary_loss():
    layer = make_layer("molora", 16, 16, 2, 4, 2, balance_loss_coef=0.0, router_z_loss_coef=0.1)
    x = torch.randn(6, 16)
    model = nn.Sequential(layer)
    model(x)
    expected = 0.1 * torch.logsumexp(x @ layer.router.weight.t(), -1).pow(2).mean()
    assert auxiliary_loss(model).item() == pytest.approx(expected.item(), rel=1e-5)


def test_capacity_drops_the_latest_slots_and_counts_them():
    experts = torch.tensor([[0], [0], [0], [1], [0]])
    plan = plan_slots(experts, num_experts=2, capacity_factor=1.0)  # capacity ceil(5/2) = 3
    assert plan.counts == [3, 1] and plan.dropped == 1
    assert plan.token_of_slot.tolist() == [0, 1, 2, 3]


def test_dropped_slots_contribute_nothing():
    layer = make_layer("molora", 16, 8, 2, 2, 1, capacity_factor=0.5)
    randomize_adapter_(layer, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 50.0  # every token chooses expert 0
    x = torch.rand(6, 16) + 0.1
    delta = layer(x) - layer.base_layer(x)
    # capacity = ceil(0.5 · 6 / 2) = 2: tokens 0 and 1 keep their slot, the rest get no update.
    assert torch.count_nonzero(delta[2:]) == 0 and torch.count_nonzero(delta[:2].abs().sum(-1)) == 2
    assert layer.traffic.dropped_slots == 4


@pytest.mark.parametrize("method,kernel", [("malora", "sparse"), ("malora", "dense"), ("molora", "sparse"),
                                           ("molora", "dense"), ("lora", "sparse")])
def test_bf16_activations_with_fp32_master_weights(method, kernel):
    """A bf16 base: products in bf16, router in fp32, fp32 gradients on the fp32 parameters."""
    n, m, rank, num_experts, tokens = 32, 24, 4, 4, 16
    layer = make_layer(method, n, m, rank, num_experts, 2 if method != "lora" else 1, expert_kernel=kernel)
    randomize_adapter_(layer, torch.Generator().manual_seed(1))
    reference = make_layer(method, n, m, rank, num_experts, 2 if method != "lora" else 1, expert_kernel=kernel)
    reference.load_state_dict(layer.state_dict())
    layer.base_layer.to(torch.bfloat16)
    reference.base_layer.weight.data = layer.base_layer.weight.data.float()  # same rounded base
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, n, generator=gen).bfloat16()
    grad_out = torch.randn(tokens, m, generator=gen)
    out = layer(x.requires_grad_())
    assert out.dtype == torch.bfloat16
    (out.float() * grad_out).sum().backward()
    ref_x = x.detach().float().requires_grad_()
    ref = reference(ref_x)
    (ref * grad_out).sum().backward()
    assert rel_err(out.float(), ref) <= 2e-2
    assert rel_err(x.grad.float(), ref_x.grad) <= 3e-2
    for name, param in adapter_params(layer).items():
        assert param.dtype == torch.float32 and param.grad.dtype == torch.float32, name
        assert rel_err(param.grad, adapter_params(reference)[name].grad) <= 3e-2, name


@pytest.mark.parametrize("method,kernel", [("malora", "dense"), ("malora", "sparse"), ("molora", "dense")])
def test_fp32_router_keeps_no_fp32_copy_of_bf16_input(method, kernel):
    """The router's fp32 product must not leave an fp32 copy of x (T×n×4 bytes) for the backward."""
    n, m, tokens = 32, 24, 16
    layer = make_layer(method, n, m, 4, 4, 2, expert_kernel=kernel)
    layer.base_layer.to(torch.bfloat16)
    x = torch.randn(tokens, n).bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert not [t for t in saved if t.dtype == torch.float32 and t.shape == (tokens, n)]
    out.float().sum().backward()
    assert layer.router.weight.grad is not None and x.grad.dtype == torch.bfloat16


def test_auto_kernel_is_dense_up_to_the_limit_then_sparse():
    from malora_dist.config.adapter import DENSE_KERNEL_MAX_EXPERTS as limit

    assert make_layer("molora", 16, 16, 2, limit, 2).kernel == "dense"
    many = make_layer("molora", 16, 16, 2, 2 * limit, 2)
    assert many.kernel == "sparse"
    assert make_layer("molora", 16, 16, 2, 8, 2, capacity_factor=1.0).kernel == "sparse"
    randomize_adapter_(many, torch.Generator().manual_seed(1))
    x = torch.randn(40, 16)
    ref = dense_adapter_output(x, many.base_layer.weight, adapter_params(many), "molora", 2, False, many.scaling)
    assert rel_err(many(x), ref) <= 1e-5
