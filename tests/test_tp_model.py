"""The tensor-parallel frozen base against Hugging Face's own model (the independent reference).

One real gloo world per world size (tp=1: one process, tp=2: two) runs every model and case; the
test functions compare its results with the unsharded HF model computed here in the parent.
"""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from malora_dist.models import (
    build_tiny_causal_lm,
    check_tp_divisibility,
    load_hf_model,
    shard_causal_lm,
    shard_causal_lm_from_pretrained,
)
from malora_dist.parallel.groups import ParallelGroups
from world import run_world

TOL = 1e-5
WORLD_SIZES = (1, 2)
BASE = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=64,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8,
)
# name -> tiny HF config on top of BASE
MODELS = {
    "llama_gqa_untied": dict(tie_word_embeddings=False),
    "llama_mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope_all_biases": dict(
        attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False
    ),
    "qwen2_qkv_bias_sliding": dict(
        model_type="qwen2",
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
        tie_word_embeddings=False,
    ),
    "mistral_sliding_tied": dict(model_type="mistral", sliding_window=4, tie_word_embeddings=True),
}
# saved with save_pretrained (transformers 5 always writes safetensors) and loaded slice by slice
SAVED = {"llama_gqa_untied": "20KB", "mistral_sliding_tied": "50GB"}  # name -> max_shard_size
PROJECTIONS = {
    "self_attn": {"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row"},
    "mlp": {"gate_proj": "column", "up_proj": "column", "down_proj": "row"},
}
SEGMENTS = [[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5]


def tiny_model(name: str) -> nn.Module:
    """A tiny HF model with every parameter perturbed, so zero biases and unit norms are tested too."""
    model = build_tiny_causal_lm({**BASE, **MODELS[name]}, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    segment_ids = torch.tensor(SEGMENTS)
    position_ids = torch.stack(
        [torch.cat([torch.arange(row.count(s)) for s in dict.fromkeys(row)]) for row in SEGMENTS]
    )
    return dict(input_ids=input_ids, labels=labels, segment_ids=segment_ids, position_ids=position_ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class _Passthrough(nn.Module):
    """Stands in for an adapter: keeps the wrapper as ``base_layer`` and calls only it."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x):
        return self.base_layer(x)


def _model_cases(model, hf_model, data, name) -> dict:
    out = {}
    ids, labels = data["input_ids"], data["labels"]
    out["all_frozen"] = not any(p.requires_grad for p in model.parameters())
    layer = model.model.layers[0]
    out["interface"] = {
        proj: (
            getattr(getattr(layer, block), proj).parallel_mode,
            getattr(getattr(layer, block), proj).in_features,
            getattr(getattr(layer, block), proj).out_features,
            tuple(getattr(getattr(layer, block), proj).weight.shape),
            getattr(getattr(layer, block), proj).tp_size,
            getattr(getattr(layer, block), proj).tp_rank,
            getattr(getattr(layer, block), proj).tp_group.size(),
        )
        for block, projs in PROJECTIONS.items()
        for proj in projs
    }
    local = model(ids)
    out["local_shape"] = tuple(local.shape)
    out["logits"] = model.gather_logits(local)
    out["token_losses"] = model.token_losses(local, labels).detach()
    out["segment_logits"] = model.gather_logits(
        model(ids, position_ids=data["position_ids"], segment_ids=data["segment_ids"])
    )
    out["generate"] = model.generate(ids[:1, :5], 6, eos_token_id=hf_model.config.eos_token_id)

    # gradients through every collective: train the (replicated) RMSNorm weights
    norms = {n: p for n, p in model.named_parameters() if "norm" in n}
    for param in norms.values():
        param.requires_grad_(True)
    valid = (labels[:, 1:] != -100).sum()
    (model.token_losses(model(ids), labels).sum() / valid).backward()
    out["norm_grads"] = {n: p.grad.clone() for n, p in norms.items()}
    for param in norms.values():
        param.requires_grad_(False)
        param.grad = None

    if name == "llama_gqa_untied":
        for block, projs in PROJECTIONS.items():
            for lyr in model.model.layers:
                for proj in projs:
                    module = getattr(lyr, block)
                    setattr(module, proj, _Passthrough(getattr(module, proj)))
        out["wrapped_logits"] = model.gather_logits(model(ids))
        with torch.no_grad():
            for param in hf_model.parameters():
                param.add_(1.0)
        out["after_hf_change"] = model.gather_logits(model(ids))
    return out


def _tp_world(tp: int, saved_dirs: dict[str, str]) -> dict:
    data = inputs()
    results = {}
    try:  # dist is up but no megatron groups: the error must say what to call
        shard_causal_lm(tiny_model("llama_gqa_untied"), ParallelGroups.single())
    except ValueError as err:
        results["no_groups_error"] = str(err)
    groups = ParallelGroups.build(tp=tp)
    for name in MODELS:
        hf_model = tiny_model(name)
        results[name] = _model_cases(shard_causal_lm(hf_model, groups), hf_model, data, name)
    for name, directory in saved_dirs.items():
        model = shard_causal_lm_from_pretrained(directory, groups)
        results[f"saved_{name}"] = model.gather_logits(model(data["input_ids"]))
    groups.destroy()
    return results


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory) -> dict[str, str]:
    dirs = {}
    for name, shard_size in SAVED.items():
        directory = tmp_path_factory.mktemp(name)
        tiny_model(name).save_pretrained(directory, max_shard_size=shard_size)
        dirs[name] = str(directory)
    # one model as an index of several shard files, one as a single file
    assert len(list(Path(dirs["llama_gqa_untied"]).glob("*.safetensors"))) > 1
    assert list(Path(dirs["mistral_sliding_tied"]).glob("*.safetensors")) == [
        Path(dirs["mistral_sliding_tied"]) / "model.safetensors"
    ]
    return dirs


@pytest.fixture(scope="module")
def worlds(saved_dirs) -> dict[int, list[dict]]:
    return {tp: run_world(tp, _tp_world, tp, saved_dirs) for tp in WORLD_SIZES}


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    """The unsharded HF model on the same inputs."""
    data = inputs()
    refs = {}
    for name in MODELS:
        hf_model = tiny_model(name)
        ids, labels = data["input_ids"], data["labels"]
        ref = {"logits": hf_model(ids).logits.detach()}
        ref["loss"] = hf_model(ids, labels=labels).loss.item()
        shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        ref["token_losses"] = F.cross_entropy(
            ref["logits"].transpose(1, 2), shifted, ignore_index=-100, reduction="none"
        )
        segment_logits = torch.empty_like(ref["logits"])
        for b, row in enumerate(SEGMENTS):
            for s in set(row):
                cols = torch.tensor(row) == s
                segment_logits[b, cols] = hf_model(ids[b, cols][None]).logits[0].detach()
        ref["segment_logits"] = segment_logits
        ref["generate"] = hf_model.generate(
            ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=6, do_sample=False
        )
        norms = {n: p for n, p in hf_model.named_parameters() if "norm" in n}
        hf_model.requires_grad_(False)
        for param in norms.values():
            param.requires_grad_(True)
        hf_model(ids, labels=labels).loss.backward()
        ref["norm_grads"] = {n: p.grad for n, p in norms.items()}
        refs[name] = ref
    return refs


CASES = [(tp, name) for tp in WORLD_SIZES for name in MODELS]


@pytest.mark.slow
@pytest.mark.parametrize("tp,name", CASES)
def test_logits_and_loss_match_hf(worlds, references, tp, name):
    ref = references[name]
    for rank, result in enumerate(worlds[tp]):
        res = result[name]
        assert res["local_shape"] == (2, 12, BASE["vocab_size"] // tp)
        assert rel_err(res["logits"], ref["logits"]) <= TOL, rank
        assert rel_err(res["token_losses"], ref["token_losses"]) <= TOL, rank
        assert (res["token_losses"][:, -1] == 0).all() and (res["token_losses"][0, :3] == 0).all()
        mean_loss = res["token_losses"].sum() / (inputs()["labels"][:, 1:] != -100).sum()
        assert abs(mean_loss.item() - ref["loss"]) / ref["loss"] <= TOL, rank


@pytest.mark.slow
@pytest.mark.parametrize("tp,name", CASES)
def test_segments_match_hf_on_each_segment(worlds, references, tp, name):
    for result in worlds[tp]:
        assert rel_err(result[name]["segment_logits"], references[name]["segment_logits"]) <= TOL
    # the mask must matter: packed logits differ from plain causal ones
    assert rel_err(references[name]["segment_logits"], references[name]["logits"]) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("tp,name", CASES)
def test_norm_gradients_match_hf(worlds, references, tp, name):
    ref = references[name]["norm_grads"]
    for result in worlds[tp]:
        grads = result[name]["norm_grads"]
        assert grads.keys() == ref.keys()
        for key in ref:
            assert rel_err(grads[key], ref[key]) <= TOL, key


@pytest.mark.slow
@pytest.mark.parametrize("tp,name", CASES)
def test_greedy_generation_matches_hf(worlds, references, tp, name):
    for result in worlds[tp]:
        assert torch.equal(result[name]["generate"], references[name]["generate"])


@pytest.mark.slow
@pytest.mark.parametrize("tp,name", CASES)
def test_projection_interface(worlds, tp, name):
    config = {**BASE, **MODELS[name]}
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    full = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden), "gate_proj": (hidden, inner), "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }  # fmt: skip
    for rank, result in enumerate(worlds[tp]):
        assert result[name]["all_frozen"]
        for block, projs in PROJECTIONS.items():
            for proj, mode in projs.items():
                n_in, n_out = full[proj]
                local = (n_out // tp, n_in) if mode == "column" else (n_out, n_in // tp)
                assert result[name]["interface"][proj] == (mode, n_in, n_out, local, tp, rank, tp)


@pytest.mark.slow
@pytest.mark.parametrize("tp", WORLD_SIZES)
def test_adapter_wrapping_and_copied_weights(worlds, references, tp):
    ref = references["llama_gqa_untied"]["logits"]
    for result in worlds[tp]:
        res = result["llama_gqa_untied"]
        assert torch.equal(res["wrapped_logits"], res["logits"])
        assert torch.equal(res["after_hf_change"], res["logits"])  # the HF weights were copied
        assert rel_err(res["logits"], ref) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("tp,name", [(tp, name) for tp in WORLD_SIZES for name in SAVED])
def test_safetensors_slice_loading(worlds, references, tp, name):
    for result in worlds[tp]:
        assert rel_err(result[f"saved_{name}"], references[name]["logits"]) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("tp", WORLD_SIZES)
def test_missing_groups_error(worlds, tp):
    for result in worlds[tp]:
        assert "ParallelGroups.build" in result["no_groups_error"]


DIVISIBILITY = [
    # (config overrides, tp, message fragments)
    (dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=576, intermediate_size=1536,
          vocab_size=49152), 2, ["num_attention_heads=9", "num_key_value_heads=3", "[1, 3]"]),
    (dict(), 4, ["num_key_value_heads=2", "[1, 2]"]),
    (dict(vocab_size=255), 2, ["vocab_size=255", "[1]"]),
    (dict(intermediate_size=99), 2, ["intermediate_size=99 of", "[1]"]),
]  # fmt: skip


@pytest.mark.parametrize("overrides,tp,fragments", DIVISIBILITY)
def test_divisibility_errors(overrides, tp, fragments):
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", **{**BASE, **overrides})
    with pytest.raises(ValueError) as err:
        check_tp_divisibility(config, tp)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_shard_checks_divisibility_before_anything_else():
    with pytest.raises(ValueError, match=re.escape("choose tp from [1, 2]")):
        shard_causal_lm(tiny_model("llama_gqa_untied"), ParallelGroups(tp=4))


def test_load_local_directory(saved_dirs):
    loaded = load_hf_model(saved_dirs["mistral_sliding_tied"])
    expected = tiny_model("mistral_sliding_tied").state_dict()
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_hub_name_offline_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="(?s)could not download 'malora-dist/no-such-model'.*pass a local directory.*GGUF"):
        load_hf_model("malora-dist/no-such-model")


def test_missing_local_path_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory or GGUF file"):
        load_hf_model(str(tmp_path / "nowhere"))


def test_tiny_builder_rejects_unknown_keys_and_is_seeded():
    with pytest.raises(ValueError, match="unknown llama config keys \\['hiden_size'\\]"):
        build_tiny_causal_lm({"hiden_size": 64})
    a = build_tiny_causal_lm(BASE, seed=3).state_dict()
    b = build_tiny_causal_lm(BASE, seed=3).state_dict()
    c = build_tiny_causal_lm(BASE, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
