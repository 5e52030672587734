"""The fused adapted linear against the reference parts (fp64, CPU): outputs, router losses, every
gradient; gradcheck of its hand-written backwards (the whole-layer Function, and the routing and
grouped-experts Functions of the path where experts take rows); the predicate that picks them;
training losses."""

import dataclasses
import itertools
import os

import pytest
import torch
import torch.nn as nn
from reference import adapter_params, dense_adapter_output, randomize_adapter_, rel_err

from malora_dist.adapters import fused_experts
from malora_dist.adapters.dropout import DropoutContext, set_dropout_context, token_places
from malora_dist.adapters.experts import GroupedExperts
from malora_dist.adapters.fused import FusedSpec, fused_adapter, fused_unsupported_reason, use_fused
from malora_dist.adapters.fused_experts import FusedGroupedExperts
from malora_dist.adapters.fused_route import FusedRouteFunction, RouteSpec, prepare_route_weights
from malora_dist.adapters.inject import auxiliary_loss
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.layout import SINGLE_PROCESS, AdapterLayout
from malora_dist.config.adapter import AdapterConfig

N_IN, M_OUT, TOKENS = 24, 20, 14
CASES = [  # method, top_k, dropout, z-loss, base bias
    (method, top_k, dropout, z_loss, bias)
    for method, top_k, dropout, z_loss, bias in itertools.product(
        ("lora", "molora", "malora"), (1, 2), (0.0, 0.3), (0.0, 0.1), (False, True))
    if not (method == "lora" and (top_k == 2 or z_loss))
]


def make_layer(kernel, method, top_k=2, dropout=0.0, z_loss=0.0, bias=False, dtype=torch.float64, **extra):
    torch.manual_seed(0)
    base = nn.Linear(N_IN, M_OUT, bias=bias).to(dtype)
    config = AdapterConfig(method=method, rank=4, num_experts=4, top_k=top_k if method != "lora" else 1,
                           lam=1.0, dropout=dropout, router_z_loss_coef=z_loss, balance_loss_coef=0.05,
                           kernel=kernel, **extra)
    layer = AdapterLinear(base, config, name="layers.0.q_proj")
    layer.to(torch.float64 if dtype == torch.float64 else torch.float32)
    for p in layer.base_layer.parameters():
        p.data = p.data.to(dtype)
    randomize_adapter_(layer, torch.Generator().manual_seed(1))
    return layer


def run(layer, x, grad_out, places=None):
    """Output, the layer's router losses and every gradient of one training step."""
    set_dropout_context(layer, None if places is None else DropoutContext(seed=3, step=2, token_place=places))
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    aux = auxiliary_loss(layer) if layer.method != "lora" else torch.zeros((), dtype=out.dtype)
    ((out.float() * grad_out).sum() + aux).backward()
    return out.detach(), aux.detach(), x.grad, {name: p.grad for name, p in adapter_params(layer).items()}


def run_pair(fused, reference, first_place):
    """``run`` of both layers on the same input, output gradient and dropout places."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, TOKENS // 2, N_IN, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(2, TOKENS // 2, M_OUT, generator=gen, dtype=torch.float64)
    places = token_places(first_place, 2, TOKENS // 2)
    return run(fused, x, grad_out, places), run(reference, x, grad_out, places)


@pytest.mark.parametrize("method,top_k,dropout,z_loss,bias", CASES)
def test_fused_matches_reference_in_fp64(method, top_k, dropout, z_loss, bias):
    fused = make_layer("fused", method, top_k, dropout, z_loss, bias)
    reference = make_layer("reference", method, top_k, dropout, z_loss, bias)
    assert fused.fused_layer is not None and reference.fused_layer is None
    (out_f, aux_f, gx_f, grads_f), (out_r, aux_r, gx_r, grads_r) = run_pair(fused, reference, 3)
    assert rel_err(out_f, out_r) <= 1e-12
    assert abs(aux_f - aux_r) <= 1e-12 * max(1.0, abs(aux_r))
    if method != "lora":
        assert torch.equal(fused.expert_load, reference.expert_load)
        assert aux_r > 0
    assert rel_err(gx_f, gx_r) <= 1e-12
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        assert grads_r[name].abs().sum() > 0, name  # every gradient is exercised
        assert rel_err(grads_f[name], grads_r[name]) <= 1e-12, name


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_fused_matches_the_independent_dense_reference(method):
    layer = make_layer("fused", method)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(TOKENS, N_IN, generator=gen, dtype=torch.float64)
    ref = dense_adapter_output(x, layer.base_layer.weight, adapter_params(layer), method, layer.top_k, False,
                               layer.scaling)
    assert rel_err(layer(x), ref) <= 1e-12


def gradcheck_inputs(method, gen):
    n, m, num, rank, width = 6, 5, 3 if method != "lora" else 1, 2, 4 if method == "malora" else 6
    x = torch.randn(7, n, generator=gen, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    bias = torch.randn(m, generator=gen, dtype=torch.float64)

    def param(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
    router = param(num, n) if method != "lora" else None
    shared = param(width, n) if method == "malora" else None
    return x, w0, bias, router, shared, param(num, rank, width), param(num, m, rank)


@pytest.mark.parametrize("method,dropout", list(itertools.product(("lora", "molora", "malora"), ("off", "on"))))
def test_gradcheck_of_the_hand_written_backward(method, dropout):
    gen = torch.Generator().manual_seed(5)
    x, w0, bias, router, shared, down, up = gradcheck_inputs(method, gen)
    keep = torch.rand(x.shape, generator=gen) >= 0.3 if dropout != "off" else None
    spec = FusedSpec(num_experts=down.shape[0], top_k=2 if method != "lora" else 1, scaling=1.5,
                     z_loss=method != "lora", keep=keep, keep_scale=1 / 0.7)

    def fn(x, *params):
        out, prob_sums, z_sum, _ = fused_adapter(x, w0, bias, *params, spec)
        return (out, prob_sums, z_sum) if method != "lora" else out
    inputs = (x,) + tuple(p for p in (router, shared, down, up) if p is not None)

    def call(x, *given):
        it = iter(given)
        return fn(x, *(next(it) if p is not None else None for p in (router, shared, down, up)))
    # top-k is piecewise constant: gradcheck's small steps do not cross a tie at these random logits
    assert torch.autograd.gradcheck(call, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,dropout", list(itertools.product(("molora", "malora"), ("off", "on"))))
def test_gradcheck_of_the_routing_function(method, dropout):
    """The routing Function of the grouped path: the base's output, z = S_A drop(x), the gates and the
    router statistics, differentiated by hand."""
    gen = torch.Generator().manual_seed(5)
    x, w0, bias, router, shared, _, _ = gradcheck_inputs(method, gen)
    keep = torch.rand(x.shape, generator=gen) >= 0.3 if dropout != "off" else None
    spec = RouteSpec(top_k=2, scaling=1.5, z_loss=True, keep=keep, keep_scale=1 / 0.7)

    def call(x, router, *rest):
        shared = rest[0] if rest else None
        weights = prepare_route_weights(router, shared, x.dtype)
        out, z, gates, _, prob_sums, z_sum, _ = FusedRouteFunction.apply(spec, weights, x, w0, bias, router, shared)
        return (out, gates, prob_sums, z_sum) + ((z,) if shared is not None else ())
    inputs = (x, router) + ((shared,) if shared is not None else ())
    assert torch.autograd.gradcheck(call, inputs, eps=1e-6, atol=1e-6)


def test_gradcheck_of_the_grouped_experts_function():
    """Rows grouped per local expert (one expert with no rows), through down then up."""
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([3, 0, 4])
    rows = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    down = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    batch = fused_experts.RowBatch(rows, counts)
    spec = fused_experts.GroupedSpec(counts=fused_experts.HostCounts(batch), partial_h=False, partial_grad_h=False)
    offsets = torch.cumsum(counts, 0).to(torch.int32)

    def call(rows, down, up):
        weights = fused_experts.prepare_grouped_weights(down, up, rows.dtype)
        return fused_experts.FusedGroupedExpertsFunction.apply(spec, weights, rows, offsets, down, up)
    assert torch.autograd.gradcheck(call, (rows, down, up), eps=1e-6, atol=1e-6)
    expected = torch.cat([rows[:3] @ down[0].t() @ up[0].t(), rows[3:] @ down[2].t() @ up[2].t()])
    assert rel_err(call(rows, down, up), expected) <= 1e-12


def test_bf16_base_stays_as_close_to_fp64_as_the_reference():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(TOKENS, N_IN, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(TOKENS, M_OUT, generator=gen, dtype=torch.float64)
    exact = run(make_layer("reference", "malora"), x, grad_out)
    errors = {}
    for kernel in ("fused", "reference"):
        layer = make_layer(kernel, "malora", dtype=torch.bfloat16)
        out, aux, gx, grads = run(layer, x.to(torch.bfloat16), grad_out)
        assert gx.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads.values())
        errors[kernel] = [rel_err(out.double(), exact[0]), rel_err(gx.double(), exact[2])] + [
            rel_err(grads[k].double(), exact[3][k]) for k in sorted(grads)]
    for fused_err, reference_err in zip(errors["fused"], errors["reference"]):
        assert fused_err <= max(2 * reference_err, 2e-2), errors


@pytest.mark.parametrize("method,dropout", [("malora", 0.0), ("malora", 0.3), ("molora", 0.0)])
def test_routing_on_a_bf16_base_is_the_reference_parts_routing(method, dropout):
    """The routing Function computes the router (and S_A) as the reference parts do on a bf16 base
    with fp32 adapter weights: the fp32 weights, x upcast; so the probabilities, the router losses
    and the top-k choices are the reference's (rounding W_g and S_A to bf16 changed them)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, TOKENS // 2, N_IN, generator=gen, dtype=torch.float64)
    places = token_places(0, 2, TOKENS // 2)
    layers = {kernel: make_layer(kernel, method, 2, dropout, 0.1, dtype=torch.bfloat16, expert_kernel="sparse")
              for kernel in ("fused", "reference")}
    assert layers["fused"].fused_route is not None and layers["reference"].fused_route is None
    results = {}
    for kernel, layer in layers.items():
        layer.train()
        set_dropout_context(layer, DropoutContext(seed=3, step=2, token_place=places))
        out = layer(x.to(torch.bfloat16))
        stats = layer.router_stats
        results[kernel] = (out.detach(), stats.prob_sums.detach(), stats.slot_counts.clone(),
                           auxiliary_loss(layer).item())
    out, prob_sums, counts, aux = results["fused"]
    ref_out, ref_prob_sums, ref_counts, ref_aux = results["reference"]
    assert torch.equal(counts, ref_counts)
    assert rel_err(prob_sums.double(), ref_prob_sums.double()) <= 1e-6
    assert aux == pytest.approx(ref_aux, rel=1e-6)
    assert rel_err(out.double(), ref_out.double()) <= 1e-2  # the experts' bf16 products, summed in other orders


def test_weights_are_prepared_once_per_optimizer_step():
    layer = make_layer("fused", "malora")
    x = torch.randn(TOKENS, N_IN, dtype=torch.float64)
    layer(x)
    first = layer.fused_layer.weights.get((layer.router.weight, layer.shared.weight, layer.expert_down,
                                           layer.expert_up), torch.float64)
    layer(x)
    again = layer.fused_layer.weights.get((layer.router.weight, layer.shared.weight, layer.expert_down,
                                           layer.expert_up), torch.float64)
    assert again is first  # no change, no rebuild
    reference = make_layer("reference", "malora")
    # plain SGD moves the parameters' _version; the fused AdamW (train/optim.py's) does not
    for optimizer in (torch.optim.SGD(layer.parameters(), lr=0.1),
                      torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)):
        (layer(x) ** 2).sum().backward()
        optimizer.step()
        reference.load_state_dict(layer.state_dict())
        assert rel_err(layer(x), reference(x)) <= 1e-12  # the step's new values, not the cached ones
    with torch.no_grad():
        layer.expert_up.mul_(2)
    reference.load_state_dict(layer.state_dict())
    assert rel_err(layer(x), reference(x)) <= 1e-12


def test_predicate_accepts_only_what_the_fused_kernel_implements():
    linear = nn.Linear(N_IN, M_OUT)
    config = AdapterConfig(method="malora", rank=4, num_experts=4, lam=1.0)
    assert fused_unsupported_reason(config, SINGLE_PROCESS, linear, False, "dense") is None
    split = AdapterLayout(ep_size=2)
    # rows grouped per expert, on one rank or split over ranks: the routing and grouped-experts Functions
    assert fused_unsupported_reason(config, split, linear, False, "sparse") is None
    assert fused_unsupported_reason(config, SINGLE_PROCESS, linear, False, "sparse") is None
    for args, why in (((config, SINGLE_PROCESS, linear, True, "dense"), "tensor-parallel"),
                      ((config, SINGLE_PROCESS, nn.Identity(), False, "dense"), "Identity"),
                      ((AdapterConfig(method="malora", rank=4, num_experts=4, lam=1.0, normalize_gates=True),
                        SINGLE_PROCESS, linear, False, "dense"), "normalize_gates")):
        assert why in fused_unsupported_reason(*args)

    @dataclasses.dataclass
    class WithNewFlag(AdapterConfig):  # a key added to the config later
        freeze_shared: bool = False
    assert fused_unsupported_reason(WithNewFlag(method="malora", rank=4, num_experts=4, lam=1.0), SINGLE_PROCESS,
                                    linear, False, "dense") is None
    assert "freeze_shared" in fused_unsupported_reason(
        WithNewFlag(method="malora", rank=4, num_experts=4, lam=1.0, freeze_shared=True), SINGLE_PROCESS, linear,
        False, "dense")
    forced = AdapterConfig(method="malora", rank=4, num_experts=4, lam=1.0, kernel="fused", normalize_gates=True)
    with pytest.raises(ValueError, match="adapter.kernel=fused cannot run layers.0.q_proj: adapter.normalize_gates"):
        AdapterLinear(nn.Linear(N_IN, M_OUT), forced, name="layers.0.q_proj")
    assert not use_fused(AdapterConfig(kernel="reference"), SINGLE_PROCESS, linear, False, "dense")
    with pytest.raises(ValueError, match="adapter.kernel must be auto, fused or reference"):
        AdapterConfig(kernel="triton")


def test_auto_picks_the_whole_layer_function_for_dense_experts_and_the_grouped_pair_for_sparse():
    dense, grouped = make_layer("auto", "malora"), make_layer("auto", "malora", expert_kernel="sparse")
    assert dense.fused_layer is not None and dense.fused_route is None
    assert grouped.fused_layer is None and grouped.fused_route is not None
    assert isinstance(grouped.experts, FusedGroupedExperts)
    reference = make_layer("reference", "malora", expert_kernel="sparse")
    assert not reference.fused and type(reference.experts) is GroupedExperts
    assert "fused" in repr(make_layer("auto", "lora")) and "fused" in repr(grouped)


GROUPED_CASES = [  # method, dropout, z-loss, base bias, capacity factor
    case for case in itertools.product(("molora", "malora"), (0.0, 0.3), (0.0, 0.1), (False, True), (None, 1.0))
    if case[3] or case[4] is None]


@pytest.mark.parametrize("method,dropout,z_loss,bias,capacity", GROUPED_CASES)
def test_fused_grouped_experts_match_reference_in_fp64(method, dropout, z_loss, bias, capacity):
    """Rows grouped per expert on one rank (the path experts split over ranks take around their
    exchange): output, router losses, x's gradient and every parameter's, with a capacity limit too."""
    extra = dict(expert_kernel="sparse", capacity_factor=capacity)
    fused = make_layer("fused", method, 2, dropout, z_loss, bias, **extra)
    reference = make_layer("reference", method, 2, dropout, z_loss, bias, **extra)
    (out, aux, grad_x, grads), (ref_out, ref_aux, ref_grad_x, ref_grads) = run_pair(fused, reference, 0)
    assert rel_err(out, ref_out) <= 1e-12 and rel_err(aux, ref_aux) <= 1e-12
    assert rel_err(grad_x, ref_grad_x) <= 1e-12
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert rel_err(grads[name], grad) <= 1e-12, name
    if capacity is not None:
        assert fused.traffic.dropped_slots == reference.traffic.dropped_slots > 0


def test_grouped_experts_pad_bf16_rank_for_grouped_mm(monkeypatch):
    """MALoRA's r̄ = 12 in bf16 spans 24 bytes, which ``grouped_mm`` refuses; padded to 16 numbers it
    runs as grouped products (no per-expert loop), forward and backward, and agrees with the fp32
    reference parts to bf16's precision."""
    calls = []
    real = fused_experts.grouped_mm
    monkeypatch.setattr(fused_experts, "grouped_mm",
                        lambda a, b, offs: calls.append(tuple(a.shape) + tuple(b.shape)) or real(a, b, offs=offs))

    def layer(kernel, dtype):
        torch.manual_seed(0)
        config = AdapterConfig(method="malora", rank=8, num_experts=4, top_k=2, lam=0.5, expert_kernel="sparse",
                               kernel=kernel, balance_loss_coef=0.01)
        built = AdapterLinear(nn.Linear(64, 48).to(dtype), config, name="layers.0.q_proj")
        randomize_adapter_(built, torch.Generator().manual_seed(1))
        return built

    bf16, fp32 = layer("fused", torch.bfloat16), layer("reference", torch.float32)
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})
    assert bf16.experts.down.shape[1] == 12 and fused_experts.padded_rank(12, torch.bfloat16) == 16
    x = torch.randn(30, 64, generator=torch.Generator().manual_seed(3))
    x_bf16, x_fp32 = x.bfloat16().requires_grad_(), x.clone().requires_grad_()
    bf16(x_bf16).float().pow(2).sum().backward()
    fp32(x_fp32).pow(2).sum().backward()
    assert len(calls) == 6 and all(16 in shapes for shapes in calls)  # 2 forward, 4 backward, all padded
    assert rel_err(x_bf16.grad.float(), x_fp32.grad) <= 2e-2
    low = adapter_params(bf16)
    for name, param in adapter_params(fp32).items():
        assert rel_err(low[name].grad, param.grad) <= 2e-2, name


# ---- training: the fused path's losses equal the reference path's -------------------------------
def train_both(root):
    from training_support import synthetic_dir, tiny_config

    from malora_dist.config.run import build_run_config
    from malora_dist.train.metrics_log import read_metrics
    from malora_dist.train.run import run_training

    data = synthetic_dir(root)
    losses = {}
    for kernel in ("reference", "fused"):
        out = os.path.join(root, kernel)
        config = build_run_config(tiny_config(data, out, adapter=dict(dropout=0.05, kernel=kernel,
                                                                      router_z_loss_coef=0.01),
                                              train=dict(steps=4), checkpoint=dict(interval=100)))
        run_training(config)
        losses[kernel] = [(r["loss"], r["grad_norm"]) for r in read_metrics(out) if "loss" in r]
    return losses


@pytest.mark.slow
def test_training_losses_match_the_reference_path(tmp_path):
    from world import run_world

    losses = run_world(1, train_both, str(tmp_path))[0]
    assert len(losses["fused"]) == len(losses["reference"]) == 4
    for (loss_f, norm_f), (loss_r, norm_r) in zip(losses["fused"], losses["reference"]):
        assert abs(loss_f - loss_r) <= 1e-5 and abs(norm_f - norm_r) <= 1e-5 * max(1.0, norm_r)


def test_launch_proxy_counts_fewer_ops_for_the_fused_kernel():
    """benchmarks/layer_ops.py: every method's fused forward+backward issues fewer ATen work ops than
    its reference parts — with all experts local, and on one rank of experts split over two (the
    exchange's local steps) — and the frozen base alone is its two products."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import layer_ops

    rows = layer_ops.measure(n=32, m=24, tokens=16)["results"]
    assert rows["base"]["work_ops"] == 2 and rows["base"]["matmuls"] == 2
    for method in ("lora-r64", "molora-r8-dense", "malora-d32-r12-dense", "molora-r8-ep2", "malora-d32-r12-ep2"):
        assert rows[method]["work_ops"] < rows[method + "-ref"]["work_ops"], method
        assert rows[method]["gflop"] == pytest.approx(rows[method + "-ref"]["gflop"], rel=0.05), method


def test_phase_timer_sums_spans_per_phase():
    from malora_dist.train.telemetry import PhaseTimer

    timer = PhaseTimer(torch.device("cpu"))
    a = timer.mark()
    b = timer.mark()
    timer.add("forward_s", a, b)
    timer.add("forward_s", a, b)
    timer.add("backward_s", b, timer.mark())
    totals = timer.totals()
    assert set(totals) == {"forward_s", "backward_s"} and totals["forward_s"] == pytest.approx(2 * (b - a))
    assert timer.totals() == {}  # spans are read once per step


@pytest.mark.parametrize("method", ["malora", "molora"])
def test_grouped_experts_run_one_grouped_product_per_projection(method):
    """The sparse kernel's experts through ``grouped_mm`` (fp32, 16-byte strides), an expert without
    rows included, against the independent dense reference; the loop stays for fp64 and odd ranks."""
    from malora_dist.adapters.cost import WorkCounter
    from malora_dist.adapters.experts import grouped_mm_fits

    torch.manual_seed(0)
    config = AdapterConfig(method=method, rank=4, num_experts=4, top_k=1, lam=1.0, expert_kernel="sparse")
    layer = AdapterLinear(nn.Linear(16, 8, bias=False), config, name="layers.0.q_proj")
    randomize_adapter_(layer, torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.router.weight[3] = -5.0  # expert 3 gets no token ...
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 16, generator=gen).abs().requires_grad_()  # ... for these inputs
    grad_out = torch.randn(12, 8, generator=gen)
    assert grouped_mm_fits(x, layer.expert_down, layer.expert_up)
    with WorkCounter() as counter:
        out = layer(x)
    # two grouped products, and only the router's and the base's plain ones (the loop: 2 more per expert)
    assert counter.names.count("_grouped_mm") == 2 and counter.names.count("mm") == 2
    (out * grad_out).sum().backward()
    assert layer.router_stats.slot_counts[3] == 0
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in adapter_params(layer).items()}
    ref_x = x.detach().clone().requires_grad_()
    ref = dense_adapter_output(ref_x, layer.base_layer.weight, ref_params, method, 1, False, layer.scaling)
    (ref * grad_out).sum().backward()
    assert rel_err(out, ref) <= 1e-5 and rel_err(x.grad, ref_x.grad) <= 1e-5
    for name, param in adapter_params(layer).items():
        assert rel_err(param.grad, ref_params[name].grad) <= 1e-5, name
    assert not grouped_mm_fits(x.double(), layer.expert_down, layer.expert_up)
    assert not grouped_mm_fits(x.bfloat16(), layer.expert_down[:, :, :3], layer.expert_up)
