"""Injection, save/load (PEFT for LoRA, bit-exact round trip for MALoRA) and the parameter report."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from reference import randomize_adapter_
from tiny_models import tiny_llama

from malora_dist.adapters.inject import adapter_layers, adapter_parameters, inject_adapters
from malora_dist.adapters.parameter_count import parameter_report
from malora_dist.config.adapter import AdapterConfig
from malora_dist.models.loading import load_model_config
from malora_dist.parallel.adapter_files import load_adapter, save_adapter

IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 100, 64]])


def trained_looking(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        randomize_adapter_(layer, gen)
    return model


def test_injection_wraps_targets_and_freezes_the_rest():
    model = inject_adapters(tiny_llama(), AdapterConfig(method="malora", rank=2, num_experts=4))
    wrapped = [name.rsplit(".", 1)[-1] for name, _ in adapter_layers(model)]
    assert sorted(set(wrapped)) == ["down_proj", "gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert len(wrapped) == 12
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model)}


def test_unknown_target_module_is_an_error():
    with pytest.raises(ValueError, match=r"\['qproj'\].*q_proj"):
        inject_adapters(tiny_llama(), AdapterConfig(method="lora", target_modules=["qproj"]))


def test_lora_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    from peft import PeftModel

    base = tiny_llama(seed=1)
    fresh_base = copy.deepcopy(base)
    config = AdapterConfig(method="lora", rank=4, alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
    model = trained_looking(inject_adapters(base, config))
    save_adapter(model, str(tmp_path), config)
    with torch.no_grad():
        ours = model(IDS).logits
        peft_model = PeftModel.from_pretrained(fresh_base, str(tmp_path)).eval()
        theirs = peft_model(IDS).logits
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
    # The adapter really changed the outputs (the comparison is not between two base models).
    with peft_model.disable_adapter(), torch.no_grad():
        assert not torch.allclose(peft_model(IDS).logits, ours, atol=1e-3)


def test_lora_adapter_round_trips_through_our_loader(tmp_path):
    config = AdapterConfig(method="lora", rank=4, alpha=12, target_modules=["q_proj", "v_proj"])
    model = trained_looking(inject_adapters(tiny_llama(seed=1), config))
    save_adapter(model, str(tmp_path), config)
    loaded = load_adapter(tiny_llama(seed=1), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)


@pytest.mark.parametrize("method", ["malora", "molora"])
def test_moe_adapter_round_trips_bit_exactly(tmp_path, method):
    config = AdapterConfig(method=method, rank=2, num_experts=4, top_k=2)
    model = trained_looking(inject_adapters(tiny_llama(seed=2), config), seed=3)
    save_adapter(model, str(tmp_path), config)
    loaded = load_adapter(tiny_llama(seed=2), str(tmp_path))
    for (name, a), (_, b) in zip(adapter_layers(model), adapter_layers(loaded)):
        for (pn, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), f"{name}.{pn}"
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, loaded(IDS).logits)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "MALORA_DIST" and saved["method"] == method


def test_loading_into_a_different_shape_names_the_tensor(tmp_path):
    config = AdapterConfig(method="malora", rank=2, num_experts=4)
    save_adapter(inject_adapters(tiny_llama(), config), str(tmp_path), config)
    other = inject_adapters(tiny_llama(), AdapterConfig(method="malora", rank=2, num_experts=4, expert_rank=2))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(other, str(tmp_path))


# ---- parameter report against the closed forms of docs/ARCHITECTURE.md §1.7 (parameter counts) ----
LLAMA2_7B = "configs/models/llama2-7b.json"
SIX_TARGETS_7B = [(4096, 4096)] * 3 + [(4096, 11008)] * 2 + [(11008, 4096)]  # (n, m) per target


def closed_form(method, r=8, N=8, d=32, r_bar=12):
    per_layer = 0
    for n, m in SIX_TARGETS_7B:
        if method == "lora":
            per_layer += r * (n + m)
        elif method == "molora":
            per_layer += N * r * (n + m) + N * n
        else:
            per_layer += d * n + N * r_bar * (d + m) + N * n
    return 32 * per_layer


@pytest.mark.parametrize("adapter,expected,percent", [
    (dict(method="lora", rank=64), closed_form("lora", r=64), 2.12),
    (dict(method="molora", rank=8, num_experts=8), closed_form("molora", r=8), 2.24),
    (dict(method="molora", rank=12, num_experts=8), closed_form("molora", r=12), 3.31),
    (dict(method="malora", rank=8, num_experts=8), closed_form("malora"), 2.36),
])
def test_parameter_report_matches_closed_form(adapter, expected, percent):
    report = parameter_report(load_model_config(LLAMA2_7B), AdapterConfig(**adapter))
    assert report["base_params"] == 6_738_415_616
    assert report["trainable_params"] == expected
    assert round(report["trainable_percent"], 2) == percent


def test_parameter_report_cli_reads_a_training_config(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("adapter:\n  method: malora\n  rank: 8\n  num_experts: 8\n")
    out = subprocess.run([sys.executable, "-m", "malora_dist.commands.params", "--model-config", LLAMA2_7B,
                          "--adapter-config", str(cfg)], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["trainable_params"] == 158_859_264 == closed_form("malora")
