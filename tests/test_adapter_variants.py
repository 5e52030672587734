"""The paper's baselines and ablations as configurations of the one adapter layer: DoRA against
PEFT's DoRA, the rest against the einsum reference, and frozen parts that are really not trained."""

import pytest
import torch
import torch.nn as nn
from reference import adapter_params, dense_adapter_output, randomize_adapter_, rel_err

from malora_dist.adapters.dora import DoraLinear
from malora_dist.adapters.inject import adapter_layers, adapter_parameters, inject_adapters
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.adapter_files import load_adapter, save_adapter

N_IN, M_OUT, TOKENS = 16, 24, 13

# (name, adapter keys, method the reference computes, parts expected frozen)
VARIANTS = [
    ("asylora", dict(method="lora", rank=8, freeze=["expert_down"]), "lora", {"expert_down"}),
    ("moasylora", dict(method="molora", rank=4, freeze=["expert_down"]), "molora", {"expert_down"}),
    ("hydralora", dict(method="hydralora", rank=4), "hydralora", {"expert_down"}),
    ("fixed_shared_A", dict(method="malora", rank=4, shared_dim=16, expert_rank=8, freeze=["shared_A"]),
     "malora", {"shared_A"}),
    ("frozen_P", dict(method="malora", rank=4, freeze=["expert_down"]), "malora", {"expert_down"}),
    ("no_asymmetry", dict(method="malora", rank=4, shared_dim=16, expert_rank=4), "malora", set()),
    ("molora_identical_init", dict(method="molora", rank=6, identical_init=True), "molora", set()),
    ("no_shared_S_A", dict(method="malora", rank=4, subspace="per_expert"), "malora", set()),
    ("no_shared_S_A_frozen_P", dict(method="malora", rank=4, subspace="per_expert", freeze=["expert_down"]),
     "malora", {"expert_down"}),
    ("shared_B", dict(method="malora", rank=4, shared_side="up"), "malora", set()),
    ("shared_B_beta", dict(method="malora", rank=4, shared_side="up", beta=1.25), "malora", set()),
]


def make_layer(keys, dtype=torch.float64, **extra):
    torch.manual_seed(0)  # the base's weight
    config = AdapterConfig(num_experts=4, top_k=2, **keys, **extra)
    return AdapterLinear(nn.Linear(N_IN, M_OUT, bias=False), config, name="layer").to(dtype)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
@pytest.mark.parametrize("name,keys,method,frozen", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_matches_einsum_reference_and_frozen_parts_get_no_gradient(name, keys, method, frozen, kernel):
    layer = make_layer(keys, expert_kernel=kernel)
    top_k = layer.top_k
    gen = torch.Generator().manual_seed(1)
    randomize_adapter_(layer, gen)
    x = torch.randn(TOKENS, N_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(TOKENS, M_OUT, generator=gen, dtype=torch.float64)
    (layer(x) * grad_out).sum().backward()

    params = adapter_params(layer)
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ref_x = x.detach().clone().requires_grad_()
    ref = dense_adapter_output(ref_x, layer.base_layer.weight, ref_params, method, top_k, False, layer.scaling)
    (ref * grad_out).sum().backward()

    assert rel_err(layer(x), ref) <= 1e-5
    assert rel_err(x.grad, ref_x.grad) <= 1e-5
    assert {k for k, p in params.items() if not p.requires_grad} == frozen
    for key, param in params.items():
        if key in frozen:
            assert param.grad is None, key
        elif not (method == "hydralora" and key == "expert_down"):
            assert rel_err(param.grad, ref_params[key].grad) <= 1e-5, key


def test_identical_init_gives_every_expert_expert_zeros_draw():
    for method, keys in (("molora", dict(rank=4)), ("malora", dict(rank=4))):
        same = make_layer(dict(method=method, identical_init=True, **keys)).expert_down.detach()
        different = make_layer(dict(method=method, **keys)).expert_down.detach()
        assert torch.equal(same[0], different[0])
        assert all(torch.equal(same[t], same[0]) for t in range(4))
        assert not torch.equal(different[1], different[0])


def test_hydralora_is_one_shared_a_and_identity_coefficients():
    layer = make_layer(dict(method="hydralora", rank=4))
    assert layer.shared_A.shape == (4, N_IN)
    assert torch.equal(layer.expert_down.detach(), torch.eye(4, dtype=torch.float64).expand(4, 4, 4))
    assert layer.scaling == 2.0  # α = 2r by default


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("keys", [dict(method="malora", rank=4, freeze=["shared_A", "expert_down"]),
                                  dict(method="lora", rank=4, freeze=["expert_down"]),
                                  dict(method="lora", rank=4, dora=True),
                                  dict(method="malora", rank=4, shared_side="up")],
                         ids=["malora_frozen_S_A_and_P", "asylora", "dora", "malora_shared_B"])
def test_frozen_parts_stay_put_through_training_and_are_saved(tmp_path, keys):
    """An optimizer built on adapter_parameters never holds a frozen part, the parts keep their
    initial values through a step, and the adapter file round-trips every tensor (frozen ones too)."""
    config = AdapterConfig(num_experts=4, top_k=2, **keys)
    model = inject_adapters(_tiny_model(), config, seed=3)
    frozen_before = {(name, part): p.detach().clone() for name, layer in adapter_layers(model)
                     for part, p in layer.adapter_tensors() if not p.requires_grad}
    assert bool(frozen_before) == bool(config.freeze)
    trainable = adapter_parameters(model)
    assert trainable and all(p.requires_grad for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    for (name, part), before in frozen_before.items():
        after = dict(model.get_submodule(name).adapter_tensors())[part]
        assert torch.equal(after, before) and after.grad is None, (name, part)

    save_adapter(model, str(tmp_path), config)
    loaded = load_adapter(_tiny_model(), str(tmp_path))
    for (name, layer), (_, other) in zip(adapter_layers(model), adapter_layers(loaded)):
        for (part, p), (_, q) in zip(layer.adapter_tensors(), other.adapter_tensors()):
            assert torch.equal(p.detach(), q.detach()), (name, part)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-6)


# ---- DoRA against PEFT's DoRA -------------------------------------------------------------------

def _peft_dora(base: nn.Linear, layer: AdapterLinear, dropout: float):
    from peft import LoraConfig, get_peft_model

    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    config = LoraConfig(r=layer.config.rank, lora_alpha=layer.config.scaling * layer.config.rank,
                        lora_dropout=dropout, target_modules=["proj"], use_dora=True, init_lora_weights=False)
    peft_model = get_peft_model(wrapper, config).double()
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.expert_down[0])
        peft_layer.lora_B["default"].weight.copy_(layer.expert_up[0])
        peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.dora.weight)
    return peft_layer


class _SameMask(nn.Module):
    """PEFT's dropout replaced by the mask our layer drew (a non-Identity module: PEFT's dropout path)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("bias", [False, True])
def test_dora_matches_peft_in_outputs_and_every_gradient(dropout, bias):
    torch.manual_seed(0)
    base = nn.Linear(N_IN, M_OUT, bias=bias).double()
    config = AdapterConfig(method="lora", rank=4, dora=True, dropout=dropout)
    layer = DoraLinear(base, config, name="layer").double()
    assert torch.allclose(layer.dora.weight, base.weight.norm(dim=1))  # ‖W0‖ per output feature
    gen = torch.Generator().manual_seed(1)
    randomize_adapter_(layer, gen)
    peft_layer = _peft_dora(nn.Linear(N_IN, M_OUT, bias=bias).double().requires_grad_(False), layer, dropout)
    peft_layer.base_layer.load_state_dict(base.state_dict())

    x = torch.randn(TOKENS, N_IN, generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(TOKENS, M_OUT, generator=gen, dtype=torch.float64)
    layer.train()
    torch.manual_seed(123)  # the layer's only random draw is its dropout mask
    out = layer(x)
    (out * grad_out).sum().backward()

    torch.manual_seed(123)
    mask = torch.nn.functional.dropout(torch.ones(TOKENS, N_IN, dtype=torch.float64), dropout, training=True)
    if dropout:
        peft_layer.lora_dropout["default"] = _SameMask(mask)
    peft_layer.train()
    ref_x = x.detach().clone().requires_grad_()
    ref = peft_layer(ref_x)
    (ref * grad_out).sum().backward()

    assert rel_err(out, ref) <= 1e-5
    assert rel_err(x.grad, ref_x.grad) <= 1e-5
    pairs = {"expert_down": peft_layer.lora_A["default"].weight, "expert_up": peft_layer.lora_B["default"].weight,
             "magnitude": peft_layer.lora_magnitude_vector["default"].weight}
    params = adapter_params(layer)
    for key, theirs in pairs.items():
        ours = params[key].grad
        assert rel_err(ours.reshape(theirs.grad.shape), theirs.grad) <= 1e-5, key


def test_dora_is_the_base_at_step_zero():
    torch.manual_seed(0)
    base = nn.Linear(N_IN, M_OUT)
    layer = DoraLinear(base, AdapterConfig(method="lora", rank=4, dora=True), name="layer")
    x = torch.randn(5, N_IN)
    assert torch.allclose(layer(x), base(x), atol=1e-6)


def test_dora_adapter_file_loads_in_peft(tmp_path):
    """The DoRA file is PEFT's: PeftModel.from_pretrained loads it and gives our logits."""
    from peft import PeftModel

    config = AdapterConfig(method="lora", rank=4, dora=True, target_modules=["q_proj", "down_proj"])
    model = inject_adapters(_tiny_model(), config, seed=3)
    gen = torch.Generator().manual_seed(1)
    for _, layer in adapter_layers(model):
        randomize_adapter_(layer, gen)
    save_adapter(model, str(tmp_path), config)
    peft_model = PeftModel.from_pretrained(_tiny_model(), str(tmp_path))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    model.eval(), peft_model.eval()
    with torch.no_grad():
        assert rel_err(model(ids).logits, peft_model(ids).logits) <= 1e-5


@pytest.mark.parametrize("keys,message", [
    (dict(method="molora", dora=True), "adapter.dora applies to method lora"),
    (dict(method="lora", freeze=["shared_A"]), "has no shared_A"),
    (dict(method="malora", freeze=["router"]), "unknown part 'router'"),
    (dict(method="malora", freeze="shared_A"), "must be a list"),
    (dict(method="malora", freeze=["shared_A", "shared_A"]), "lists a part twice"),
    (dict(method="hydralora", freeze=["expert_down"]), "always the fixed identity"),
    (dict(method="hydralora", shared_dim=8), "remove adapter.shared_dim"),
    (dict(method="lora", identical_init=True), "identical_init"),
    (dict(method="hydralora", identical_init=True), "identical_init"),
    (dict(method="lora", dora="yes"), "must be true or false"),
    (dict(method="molora", subspace="per_expert"), "has no subspace to split"),
    (dict(method="malora", subspace="private"), "must be shared or per_expert"),
    (dict(method="malora", subspace="per_expert", freeze=["shared_A"]), "has no shared_A"),
    (dict(method="molora", shared_side="up"), "method molora has none"),
    (dict(method="malora", shared_side="left"), "must be down or up"),
    (dict(method="malora", shared_side="up", subspace="per_expert"), "use one of the two"),
    (dict(method="malora", shared_side="up", freeze=["expert_down"]), "remove adapter.freeze"),
    (dict(method="malora", shared_side="up", freeze=["shared_A"]), "remove adapter.freeze"),
    (dict(method="malora", shared_side="up", identical_init=True), "set identical_init: false"),
])
def test_bad_variant_keys_are_refused_with_the_fix(keys, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**keys)


def test_per_expert_subspaces_are_each_experts_own_svd():
    """subspace: per_expert gives expert t the S_t = β V_t of its own draw (expert 0's is the shared S_A)."""
    keys = dict(method="malora", rank=4, beta=1.5)
    own = make_layer(dict(keys, subspace="per_expert"))
    shared = make_layer(keys)
    assert own.shared_A is None and own.experts.subspace.shape == (4, 8, N_IN)  # d = λ·r·N = 8
    assert torch.equal(own.experts.subspace[0], shared.shared_A)
    assert torch.equal(own.expert_down, shared.expert_down)
    assert not torch.allclose(own.experts.subspace[1], own.experts.subspace[0])


def test_analysis_reads_each_methods_down_projections(tmp_path):
    """The analysis composes an expert's down-projection in the input space: P_t S_A, B_t's shared A
    (HydraLoRA), P_t S_t (per-expert subspaces)."""
    from malora_dist.analysis.subspaces import layer_experts
    from malora_dist.parallel.adapter_files import adapter_state

    for keys in (dict(method="hydralora", rank=4), dict(method="malora", rank=4, subspace="per_expert"),
                 dict(method="malora", rank=4, shared_side="up")):
        config = AdapterConfig(num_experts=4, top_k=2, target_modules=["proj"], **keys)
        model = inject_adapters(nn.ModuleDict({"proj": nn.Linear(N_IN, M_OUT, bias=False)}), config)
        layer = model["proj"]
        with torch.no_grad():  # Ā_t starts at zero under shared_side: up; give every part values
            randomize_adapter_(layer, torch.Generator().manual_seed(0))
        down, up = layer_experts(adapter_state(model), "proj", config)
        for t in range(4):
            if config.method == "hydralora":
                expected = layer.shared_A
            elif config.subspace == "per_expert":
                expected = layer.expert_down[t] @ layer.experts.subspace[t]
            else:
                expected = layer.expert_down[t]
            expected_up = layer.shared_up.weight @ layer.expert_up[t] if config.has_shared_up else layer.expert_up[t]
            assert torch.allclose(down[t], expected.double().detach())
            assert torch.allclose(up[t], expected_up.double().detach(), atol=1e-6)  # S_B P_t formed in fp32


def test_shared_B_starts_as_malora_transposed_and_every_part_learns():
    """shared_side: up starts at the base (Ā_t = 0) with S_B = β V_0ᵀ (orthonormal columns times β) and
    S_B P_0 the first r̄ rows of expert 0's Kaiming draw, transposed (entries within U(±1/√m), whatever
    β is); the first gradient reaches Ā_t only, and after one step every part gets one."""
    layers = {beta: make_layer(dict(method="malora", rank=4, shared_side="up", beta=beta)) for beta in (1.0, 1.5)}
    layer = layers[1.5]
    s_b, p_t = layer.shared_up.weight.detach(), layer.expert_up.detach()
    assert s_b.shape == (M_OUT, 8) and p_t.shape == (4, 8, 6) and layer.expert_down.shape == (4, 6, N_IN)
    assert torch.count_nonzero(layer.expert_down) == 0
    assert torch.allclose(s_b.t() @ s_b, 1.5 ** 2 * torch.eye(8, dtype=s_b.dtype), atol=1e-5)  # an fp32 SVD
    kaiming = s_b @ p_t[0]
    assert kaiming.abs().max() <= 1 / M_OUT ** 0.5
    assert torch.allclose(kaiming, layers[1.0].shared_up.weight @ layers[1.0].expert_up[0], atol=1e-6)
    assert not torch.allclose(s_b @ p_t[1], kaiming)

    x = torch.randn(TOKENS, N_IN, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.equal(layer(x), layer.base_layer(x))
    optimizer = torch.optim.SGD([p for _, p in layer.adapter_tensors()], lr=0.1)
    for step in range(2):
        optimizer.zero_grad()
        (layer(x) ** 2).sum().backward()
        grads = {name: p.grad.norm().item() for name, p in layer.adapter_tensors()}
        if step == 0:
            assert grads["expert_down"] > 0 and grads["expert_up"] == grads["shared_B"] == grads["router.weight"] == 0
        else:
            assert all(g > 0 for g in grads.values()), grads
        optimizer.step()


def test_shared_B_needs_d_within_the_output_size():
    config = AdapterConfig(method="malora", rank=4, num_experts=4, top_k=2, shared_side="up")  # d = 8
    with pytest.raises(ValueError, match="exceeds the output size m=6 of narrow"):
        AdapterLinear(nn.Linear(N_IN, 6, bias=False), config, name="narrow")


def test_placement_prices_shared_B_as_x_out_and_d_back():
    """The exchange moves x (n numbers) out and the experts' d-vectors back; an expert holds
    Ā_t (r̄×n) and P_t (d×r̄), which replicate's extra all-reduce carries."""
    from malora_dist.parallel.placement import LinkModel, placement_costs

    config = AdapterConfig(method="malora", rank=4, num_experts=4, top_k=2, shared_side="up")  # d = 8, r̄ = 6
    tokens, dp, ep = 10, 2, 2
    costs = placement_costs(config, N_IN, M_OUT, tokens, dp, ep, LinkModel(1e-4, 1e9))
    assert costs.exchange_terms.link_bytes == pytest.approx(2 * tokens * 2 * (N_IN + 8) * 4 * (ep - 1) / ep)
    assert costs.replicate_terms.reduce_bytes == pytest.approx(2 * (dp - 1) / dp * 4 * 6 * (N_IN + 8) * 4)
