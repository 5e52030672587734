"""MoLoRA, MALoRA and HydraLoRA as a PEFT method (``malora_dist.peft_method``, peft_type MALORA_DIST).

Adapters written by ``save_adapter`` (random values, so that every part matters) load with
``PeftModel.from_pretrained`` into a plain Hugging Face model. Each adapted linear is checked
against the independent einsum reference of ``tests/reference.py``, and the model's logits against
the package's own model; ``save_pretrained`` round-trips the tensors and the package loads what PEFT
wrote. The trained adapters (ep=2, a fresh process) are in ``test_peft_export.py``.
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from reference import dense_adapter_output, randomize_adapter_
from safetensors.torch import load_file
from tiny_models import tiny_llama

import malora_dist.peft_method  # noqa: F401  (registers the method)
from malora_dist.adapters.inject import adapter_layers, inject_adapters
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.adapter_files import adapter_state, load_adapter, read_adapter_state, save_adapter
from malora_dist.peft_method import MaloraDistConfig, MaloraDistLayer, register

IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 100, 64, 3, 17]])
MOE = dict(rank=2, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
VARIANTS = {
    "molora": dict(method="molora", **MOE),
    "malora": dict(method="malora", lam=1.0, **MOE),
    "malora_shared_up": dict(method="malora", lam=1.0, shared_side="up", **MOE),
    "malora_per_expert": dict(method="malora", lam=1.0, subspace="per_expert", **MOE),
    "malora_frozen": dict(method="malora", lam=1.0, freeze=["shared_A", "expert_down"], normalize_gates=True, **MOE),
    "hydralora": dict(method="hydralora", **MOE),
    "molora_capacity": dict(method="molora", capacity_factor=1.0, expert_kernel="sparse", **MOE),
}
# The einsum reference has no capacity (dropped slots)
WITH_REFERENCE = [name for name in VARIANTS if name != "molora_capacity"]


def written_adapter(directory, variant, seed=1):
    """The package's model with a random adapter of ``variant``, saved to ``directory``."""
    config = AdapterConfig(**VARIANTS[variant])
    model = inject_adapters(tiny_llama(seed=seed), config)
    generator = torch.Generator().manual_seed(2)
    for _, layer in adapter_layers(model):
        randomize_adapter_(layer, generator)
    save_adapter(model, str(directory), config)
    return model.eval()


def peft_load(directory, seed=1, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(tiny_llama(seed=seed), str(directory), **kwargs)
    # PEFT warns about keys it could not place and config keys it does not know: neither may happen
    assert not [str(w.message) for w in caught if "key" in str(w.message).lower()]
    return model.eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_loads_the_adapter_with_the_package_logits(tmp_path, variant):
    ours = written_adapter(tmp_path, variant)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MALORA_DIST" and saved["method"] == VARIANTS[variant]["method"]
    model = peft_load(tmp_path)
    layers = [m for m in model.modules() if isinstance(m, MaloraDistLayer)]
    assert len(layers) == 2 * len(MOE["target_modules"])
    with torch.no_grad():
        expected, got = ours(IDS).logits, model(IDS).logits
        base = tiny_llama(seed=1)(IDS).logits
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (expected - base).abs().max() > 1e-2  # the adapter changes the output


@pytest.mark.parametrize("variant", WITH_REFERENCE)
def test_each_peft_layer_matches_the_einsum_reference(tmp_path, variant):
    ours = written_adapter(tmp_path, variant)
    model = peft_load(tmp_path)
    config = AdapterConfig(**VARIANTS[variant])
    mine = dict(adapter_layers(ours))
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))  # tiny_llama: hidden 32, mlp 64
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, MaloraDistLayer):
            continue
        params = dict(layer.adapter_modules["default"].adapter_tensors())
        for part, value in dict(mine[name].adapter_tensors()).items():
            assert torch.equal(params[part], value), (name, part)
        rows = x[:, :layer.in_features]
        with torch.no_grad():
            reference = dense_adapter_output(rows, layer.base_layer.weight, params, config.method, config.top_k,
                                             config.normalize_gates, config.scaling)
            torch.testing.assert_close(layer(rows), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["malora", "malora_shared_up", "malora_per_expert", "hydralora"])
def test_save_pretrained_round_trips_and_the_package_reads_it(tmp_path, variant):
    ours = written_adapter(tmp_path / "ours", variant)
    model = peft_load(tmp_path / "ours")
    model.save_pretrained(str(tmp_path / "peft"))
    written, resaved = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert written.keys() == resaved.keys()
    for key, value in written.items():
        assert torch.equal(resaved[key], value), key
    config = {k: v for k, v in json.loads((tmp_path / "peft" / "adapter_config.json").read_text()).items()}
    assert config["peft_type"] == "MALORA_DIST" and config["method"] == VARIANTS[variant]["method"]
    reloaded = peft_load(tmp_path / "peft")
    again = load_adapter(tiny_llama(seed=1), str(tmp_path / "peft"))  # and the package reads PEFT's file
    state, expected = adapter_state(again), adapter_state(ours)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    read, _ = read_adapter_state(str(tmp_path / "peft"))  # without a model (the analysis reads it so)
    assert read.keys() == expected.keys() and all(torch.equal(read[k], expected[k]) for k in read)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_disable_adapter_gives_the_base_and_generate_runs(tmp_path):
    written_adapter(tmp_path, "malora")
    model = peft_load(tmp_path)
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(IDS).logits
        adapted = model(IDS).logits
        base = tiny_llama(seed=1)(IDS).logits
    assert torch.equal(disabled, base) and not torch.allclose(adapted, base, atol=1e-2)
    out = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4, do_sample=False)
    # greedy decoding with the KV cache continues as the full forward of the adapted model would
    with torch.no_grad():
        full = model(out[:, :-1]).logits
    assert out.shape == (1, IDS.shape[1] + 4)
    assert torch.equal(full[0, IDS.shape[1] - 1:].argmax(-1), out[0, IDS.shape[1]:])


def test_merge_is_refused_with_the_reason_and_unload_gives_the_base(tmp_path):
    written_adapter(tmp_path, "molora")
    model = peft_load(tmp_path)
    with pytest.raises(ValueError, match="cannot be merged into the base weights: each token's update goes through "
                                         "the experts its router picks"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()
    assert any(isinstance(m, MaloraDistLayer) for m in model.modules())  # the refusal left the model intact
    base = model.unload()
    assert not any(isinstance(m, MaloraDistLayer) for m in base.modules())
    with torch.no_grad():
        assert torch.equal(base(IDS).logits, tiny_llama(seed=1)(IDS).logits)


def test_frozen_parts_stay_frozen_when_loaded_for_training(tmp_path):
    written_adapter(tmp_path, "malora_frozen")
    model = peft_load(tmp_path, is_trainable=True)
    trainable = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"experts.up", "router.weight"}
    model.base_model.set_requires_grad("default", True)  # PEFT's own switch keeps them frozen too
    assert {n for n, p in model.named_parameters() if p.requires_grad and "experts.down" in n} == set()


def test_get_peft_model_starts_from_the_package_initial_values():
    """A fresh PEFT adapter draws as ``inject_adapters`` does (seed 0, each linear's name)."""
    keys = dict(method="malora", lam=1.0, **MOE)
    peft_model = get_peft_model(tiny_llama(seed=1), MaloraDistConfig(**keys))
    ours = dict(adapter_layers(inject_adapters(tiny_llama(seed=1), AdapterConfig(**keys))))
    layers = [(n, m) for n, m in peft_model.base_model.model.named_modules() if isinstance(m, MaloraDistLayer)]
    assert len(layers) == len(ours)
    for name, layer in layers:
        for (part, value), (_, expected) in zip(layer.adapter_modules["default"].adapter_tensors(),
                                                ours[name].adapter_tensors()):
            assert torch.equal(value, expected), (name, part)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for layer in ours.values() for _, p in layer.adapter_tensors())


def test_lora_and_bad_keys_and_other_layers_are_refused():
    with pytest.raises(ValueError, match="method lora is PEFT's own LoRA method"):
        MaloraDistConfig(method="lora", rank=4)
    with pytest.raises(ValueError, match="top_k=5 exceeds adapter.num_experts=4"):
        MaloraDistConfig(method="molora", num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="embed_tokens is a Embedding: the malora_dist PEFT method adapts "
                                         "torch.nn.Linear"):
        get_peft_model(tiny_llama(), MaloraDistConfig(method="molora", rank=2, num_experts=4,
                                                      target_modules=["embed_tokens"]))


def test_registration_is_idempotent_and_the_package_import_does_not_load_peft():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import PeftType

    assert register() is register() is PeftType.MALORA_DIST
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MALORA_DIST"] is MaloraDistConfig
    assert isinstance(MaloraDistConfig(method="molora").peft_type, PeftType)
    # training and export write the PEFT form without importing PEFT
    code = ("import sys, malora_dist, malora_dist.export.checkpoint; "
            "assert 'peft' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_a_second_adapter_is_added_and_switched(tmp_path):
    written_adapter(tmp_path / "a", "molora")
    written_adapter(tmp_path / "b", "malora")
    model = peft_load(tmp_path / "a")
    with torch.no_grad():
        first = model(IDS).logits
        model.load_adapter(str(tmp_path / "b"), adapter_name="b")
        model.set_adapter("b")
        second = model(IDS).logits
        only_b = peft_load(tmp_path / "b")(IDS).logits
    assert torch.equal(second, only_b) and not torch.allclose(first, second, atol=1e-3)


def test_low_cpu_mem_usage_and_a_bf16_base(tmp_path):
    """PEFT's meta-device loading gives the same model; on a bf16 base the adapter keeps fp32
    parameters (as in training) and its products run in bf16."""
    ours = written_adapter(tmp_path, "malora")
    with torch.no_grad():
        expected = ours(IDS).logits
        assert torch.equal(peft_load(tmp_path, low_cpu_mem_usage=True)(IDS).logits, expected)
        model = PeftModel.from_pretrained(tiny_llama(seed=1).to(torch.bfloat16), str(tmp_path)).eval()
        logits = model(IDS).logits
    assert {p.dtype for n, p in model.named_parameters() if ".malora_dist_adapter." in n} == {torch.float32}
    assert logits.dtype == torch.bfloat16
    # bf16 rounding, not a missing adapter
    assert (logits.float() - expected).abs().max() <= 5e-2 * expected.abs().max()
