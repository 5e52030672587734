"""The variant description (``adapters/variant.py``) against what its readers really hold and do: a
built layer's parameters and their tags, the keys and shapes ``save_adapter`` writes, the rows the
dispatcher sends and gets back, the bytes placement prices, and the experts the analysis composes."""

import dataclasses

import pytest
import torch
import torch.nn as nn
from reference import randomize_adapter_
from safetensors.torch import load_file

from malora_dist.adapters.dora import DoraLinear
from malora_dist.adapters.file_format import LORA_PART_KEYS, PEFT_MODEL_PREFIX, WEIGHTS_NAME, mixture_file_key
from malora_dist.adapters.fused import FusedLayer
from malora_dist.adapters.fused_route import FusedRoute
from malora_dist.adapters.inject import adapter_layers, auxiliary_loss, inject_adapters
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.layer_class import adapter_linear
from malora_dist.adapters.router import TopKRouter
from malora_dist.adapters.variant import DORA, PLAIN, SHARED_UP, AdapterVariant
from malora_dist.analysis.subspaces import layer_experts
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.adapter_files import adapter_state, checkpoint_keys, load_adapter_state, save_adapter
from malora_dist.parallel.placement import LinkModel, placement_costs
from malora_dist.runtime.groups import ParallelGroups

N_IN, M_OUT, EXPERTS, TOKENS = 16, 24, 4, 10
# rank 4, N = 4, λ = 0.5: MALoRA's d = 8 and r̄ = 6; HydraLoRA's d = r̄ = r = 4 (all sizes apart from n, m)
CASES = {
    "lora": dict(method="lora", rank=4),
    "lora_dora": dict(method="lora", rank=4, dora=True),
    "asylora": dict(method="lora", rank=4, freeze=["expert_down"]),
    "molora": dict(method="molora", rank=4),
    "moasylora": dict(method="molora", rank=4, freeze=["expert_down"]),
    "malora": dict(method="malora", rank=4),
    "malora_frozen_S_A_and_P": dict(method="malora", rank=4, freeze=["shared_A", "expert_down"]),
    "malora_shared_up": dict(method="malora", rank=4, shared_side="up"),
    "malora_per_expert": dict(method="malora", rank=4, subspace="per_expert"),
    "malora_per_expert_frozen_P": dict(method="malora", rank=4, subspace="per_expert", freeze=["expert_down"]),
    "hydralora": dict(method="hydralora", rank=4),
}
ROUTER = {"router.weight": ((EXPERTS, N_IN), "n", False)}
# per case: {part: (full shape, tp split, frozen)}, the forward kind, (sent, returned) per slot
EXPECTED = {
    "lora": ({"expert_down": ((1, 4, N_IN), "n", False), "expert_up": ((1, M_OUT, 4), "m", False)},
             PLAIN, (N_IN, M_OUT)),
    "lora_dora": ({"expert_down": ((1, 4, N_IN), "n", False), "expert_up": ((1, M_OUT, 4), "m", False),
                   "magnitude": ((M_OUT,), "m", False)}, DORA, (N_IN, M_OUT)),
    "asylora": ({"expert_down": ((1, 4, N_IN), "n", True), "expert_up": ((1, M_OUT, 4), "m", False)},
                PLAIN, (N_IN, M_OUT)),
    "molora": ({"expert_down": ((EXPERTS, 4, N_IN), "n", False), "expert_up": ((EXPERTS, M_OUT, 4), "m", False),
                **ROUTER}, PLAIN, (N_IN, M_OUT)),
    "moasylora": ({"expert_down": ((EXPERTS, 4, N_IN), "n", True), "expert_up": ((EXPERTS, M_OUT, 4), "m", False),
                   **ROUTER}, PLAIN, (N_IN, M_OUT)),
    "malora": ({"expert_down": ((EXPERTS, 6, 8), None, False), "expert_up": ((EXPERTS, M_OUT, 6), "m", False),
                "shared_A": ((8, N_IN), "n", False), **ROUTER}, PLAIN, (8, M_OUT)),
    "malora_frozen_S_A_and_P": ({"expert_down": ((EXPERTS, 6, 8), None, True),
                                 "expert_up": ((EXPERTS, M_OUT, 6), "m", False), "shared_A": ((8, N_IN), "n", True),
                                 **ROUTER}, PLAIN, (8, M_OUT)),
    "malora_shared_up": ({"expert_down": ((EXPERTS, 6, N_IN), "n", False), "expert_up": ((EXPERTS, 8, 6), None, False),
                          "shared_B": ((M_OUT, 8), "m", False), **ROUTER}, SHARED_UP, (N_IN, 8)),
    "malora_per_expert": ({"expert_down": ((EXPERTS, 6, 8), None, False),
                           "expert_up": ((EXPERTS, M_OUT, 6), "m", False),
                           "expert_subspace": ((EXPERTS, 8, N_IN), "n", False), **ROUTER}, PLAIN, (N_IN, M_OUT)),
    "malora_per_expert_frozen_P": ({"expert_down": ((EXPERTS, 6, 8), None, True),
                                    "expert_up": ((EXPERTS, M_OUT, 6), "m", False),
                                    "expert_subspace": ((EXPERTS, 8, N_IN), "n", False), **ROUTER},
                                   PLAIN, (N_IN, M_OUT)),
    "hydralora": ({"expert_down": ((EXPERTS, 4, 4), None, True), "expert_up": ((EXPERTS, M_OUT, 4), "m", False),
                   "shared_A": ((4, N_IN), "n", False), **ROUTER}, PLAIN, (4, M_OUT)),
}
ROUTED = [name for name, keys in CASES.items() if keys["method"] != "lora"]


def config_of(case, **extra):
    return AdapterConfig(num_experts=EXPERTS, top_k=2, target_modules=["proj"], **CASES[case], **extra)


def model_of(config, seed=3):
    torch.manual_seed(0)  # the base's weight
    return inject_adapters(nn.ModuleDict({"proj": nn.Linear(N_IN, M_OUT, bias=False)}), config, seed=seed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_description_is_what_the_built_layer_holds(case):
    """Parts, full shapes, tensor-parallel splits, frozen parts and forward kind as the math says;
    the layer holds exactly those parameters, at the parts' paths, tagged and frozen as described."""
    config = config_of(case)
    variant = AdapterVariant.of(config, N_IN, M_OUT)
    parts, forward, (sent, returned) = EXPECTED[case]
    assert {p.name: (p.shape, p.split, p.frozen) for p in variant.parts} == parts
    assert (variant.forward, variant.sent_width, variant.returned_width) == (forward, sent, returned)
    with pytest.raises(dataclasses.FrozenInstanceError):
        variant.n = 1

    layer = adapter_linear(nn.Linear(N_IN, M_OUT, bias=False), config, name="proj")
    assert type(layer) is (DoraLinear if forward == DORA else AdapterLinear)
    assert layer.variant == variant
    held = layer.adapter_tensors()
    assert [(name, tuple(p.shape)) for name, p in held] == [(p.name, p.shape) for p in variant.parts]
    by_path = dict(layer.named_parameters())
    for part, (_, param) in zip(variant.parts, held):
        assert by_path[part.path] is param, part.path  # the name the state dict and the files give it
        assert param.requires_grad == (not part.frozen), part.name
        assert param.malora_expert == (part.per_expert and variant.routed), part.name
        for mode, size in (("row", N_IN), ("column", M_OUT)):  # a split dim holds the size it splits
            dim = part.tp_dim(mode)
            assert dim is None or part.shape[dim] == size, (part.name, mode)
        assert (part.tp_dim("row") is not None, part.tp_dim("column") is not None) == (
            part.split == "n", part.split == "m")
    trainable = {id(p) for _, p in held if p.requires_grad}
    assert {id(p) for p in layer.parameters() if p.requires_grad} == trainable  # nothing else is trained
    skeleton = adapter_linear(nn.Linear(N_IN, M_OUT, bias=False, device="meta"), config, name="proj")
    assert [(n, tuple(p.shape)) for n, p in skeleton.adapter_tensors()] == [(p.name, p.shape) for p in variant.parts]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_file_keys_and_shapes_are_the_parts(case, tmp_path):
    """What save_adapter writes: one full tensor per part under its path (the PEFT mixture method),
    or PEFT's LoRA names for method lora; checkpoint keys split each per-expert part by expert."""
    config = config_of(case)
    model = model_of(config)
    variant = model["proj"].variant
    save_adapter(model, str(tmp_path), config)
    written = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / WEIGHTS_NAME)).items()}
    if config.method == "lora":
        expected = {f"{PEFT_MODEL_PREFIX}proj.{LORA_PART_KEYS[p.name]}": p.local_shape(1)[1:] if p.per_expert
                    else p.shape for p in variant.parts}
    else:
        expected = {mixture_file_key("proj", p.name): p.shape for p in variant.parts}
        assert all(k.endswith(p.path) for k, p in zip(expected, variant.parts))
    assert written == expected
    checkpoint = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    assert checkpoint == {k: p.shape[1:] if p.per_expert else p.shape for p in variant.parts
                          for k in checkpoint_keys("proj", p.name, variant.num_experts, config.method)}


def test_a_tensor_of_another_shape_is_refused_with_the_parts_shape():
    config = config_of("malora")
    model = model_of(config)
    state = adapter_state(model)
    state["proj.shared_A"] = torch.zeros(8, N_IN + 1)
    with pytest.raises(ValueError, match=r"proj.shared_A has shape \(8, 17\), where this model's malora adapter "
                                         r"holds \(8, 16\)"):
        load_adapter_state(model, state, ParallelGroups.single())


# the whole-layer Function (dense experts, kernel auto) has no dispatch to watch: it runs no experts part
@pytest.mark.parametrize("expert_kernel,kernel", [("sparse", "reference"), ("sparse", "auto"), ("dense", "reference")])
@pytest.mark.parametrize("case", ROUTED)
def test_the_per_slot_widths_are_what_the_dispatcher_moves(case, expert_kernel, kernel):
    """The experts receive rows (or, dense, every token's input) of ``sent_width`` and give back
    results of ``returned_width``, on the reference parts and the fused routing and experts alike."""
    layer = adapter_linear(nn.Linear(N_IN, M_OUT, bias=False), config_of(case, expert_kernel=expert_kernel,
                                                                         kernel=kernel), name="proj")
    seen = []
    forward = layer.experts.forward

    def watched(batch, out):
        result = forward(batch, out)
        seen.append((getattr(batch, "rows", getattr(batch, "inputs", None)).shape[-1], result.shape[-1]))
        return result
    layer.experts.forward = watched
    layer(torch.randn(TOKENS, N_IN))
    assert seen == [(layer.variant.sent_width, layer.variant.returned_width)]


@pytest.mark.parametrize("case", ["molora", "moasylora", "malora", "malora_shared_up", "malora_per_expert",
                                  "hydralora"])
def test_placement_prices_the_variants_widths_and_trainable_expert_numbers(case):
    """The exchange's bytes: k slots per token of sent_width out and returned_width back, both ways;
    replicate's extra all-reduce: the trainable numbers of one expert, counted on a built layer."""
    config = config_of(case)
    variant = AdapterVariant.of(config, N_IN, M_OUT)
    dp, ep = 2, 2
    costs = placement_costs(config, N_IN, M_OUT, TOKENS, dp, ep, LinkModel(1e-4, 1e9))
    slots = TOKENS * config.top_k
    assert costs.exchange_terms.link_bytes == pytest.approx(
        2 * slots * (variant.sent_width + variant.returned_width) * 4 * (ep - 1) / ep)
    layer = adapter_linear(nn.Linear(N_IN, M_OUT, bias=False), config, name="proj")
    per_expert = sum(p.numel() for part, (_, p) in zip(variant.parts, layer.adapter_tensors())
                     if part.per_expert and p.requires_grad) // EXPERTS
    assert variant.trainable_numbers_per_expert == per_expert
    assert costs.replicate_terms.reduce_bytes == pytest.approx(2 * (dp - 1) / dp * EXPERTS * per_expert * 4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_analysis_composes_each_variants_experts(case):
    """Each expert's down (r × n) and up (m × r) from its factors: A_t / B_t, P_t S_A / B̄_t (HydraLoRA
    P_t = I), P_t S_t / B̄_t, Ā_t / S_B P_t."""
    config = config_of(case)
    model = model_of(config)
    layer = model["proj"]
    randomize_adapter_(layer, torch.Generator().manual_seed(0))
    params = {name: p.detach().double() for name, p in layer.adapter_tensors()}
    down, up = layer_experts(adapter_state(model), "proj", config)
    assert len(down) == len(up) == layer.variant.num_experts
    for t, (d_t, u_t) in enumerate(zip(down, up)):
        expected_down = params["expert_down"][t]
        if "shared_A" in params:
            expected_down = expected_down @ params["shared_A"]
        if "expert_subspace" in params:
            expected_down = expected_down @ params["expert_subspace"][t]
        expected_up = params["expert_up"][t]
        if "shared_B" in params:
            expected_up = params["shared_B"] @ expected_up
        assert d_t.shape == (layer.variant.rank, N_IN) and u_t.shape == (M_OUT, layer.variant.rank)
        assert torch.allclose(d_t, expected_down) and torch.allclose(u_t, expected_up)


def test_the_plain_layer_does_not_run_dora():
    """DoRA's forward is DoraLinear's: the plain class refuses a DoRA config rather than drop its magnitude."""
    config = AdapterConfig(method="lora", rank=4, dora=True)
    with pytest.raises(ValueError, match="does not run the dora forward of proj: build it with"):
        AdapterLinear(nn.Linear(N_IN, M_OUT), config, name="proj")
    assert not hasattr(adapter_linear(nn.Linear(N_IN, M_OUT), AdapterConfig(method="lora", rank=4)), "dora")


@pytest.mark.parametrize("expert_kernel,part", [("dense", FusedLayer), ("sparse", FusedRoute)])
def test_the_fused_part_owns_its_cache_and_reports_through_the_router(expert_kernel, part, monkeypatch):
    config = config_of("malora", expert_kernel=expert_kernel, router_z_loss_coef=0.1)
    model = model_of(config)
    layer = model["proj"]
    fused = layer.fused_layer if part is FusedLayer else layer.fused_route
    assert isinstance(fused, part) and layer.fused
    assert (layer.fused_layer is None) == (part is FusedRoute)
    reports = []
    record = TopKRouter.record
    monkeypatch.setattr(TopKRouter, "record", lambda self, *args: reports.append(args) or record(self, *args))
    layer(torch.randn(TOKENS, N_IN))
    assert len(reports) == 1
    counts, tokens, prob_sums, z_sum = reports[0]
    assert tokens == TOKENS and int(counts.sum()) == TOKENS * config.top_k and prob_sums.shape == (EXPERTS,)
    stats = layer.router_stats
    assert stats.z_sum is z_sum and stats.top_k == config.top_k
    params = (layer.router.weight, layer.shared.weight) + ((layer.expert_down, layer.expert_up) if part is FusedLayer
                                                            else ())
    built = fused.weights.get(params, torch.float32)
    assert fused.weights.get(params, torch.float32) is built  # kept until a parameter changes
    other = model_of(config)["proj"]
    assert (other.fused_layer or other.fused_route).weights is not fused.weights  # each layer's own
    auxiliary_loss(model)
    assert all(other.router_stats is None for _, other in adapter_layers(model))  # cleared once the losses are formed
