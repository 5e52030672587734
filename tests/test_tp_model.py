"""The tensor-parallel frozen base against Hugging Face's own model (the independent reference).

One real gloo world per world size (tp=1: one process, tp=2: two) runs every model family and
case; the test functions compare its results with the unsharded HF model computed here in the
parent. The families cover every plan style the base implements: ``colwise`` / ``rowwise``,
``replicated_with_grad_allreduce`` (Qwen3, Gemma3 q/k norms), ``colwise_gather_output`` /
``rowwise_split_input`` (OLMo2's full-width q/k norms, Phi-3's fused projections), and a config
without a plan (GPT-2, tp=1 only).
"""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from world import run_world

from malora_dist.evaluation.packing import OptionTree, tree_batches
from malora_dist.evaluation.scoring import score_batch
from malora_dist.models import (
    build_tiny_causal_lm,
    check_plan,
    check_tp_divisibility,
    load_hf_model,
    shard_causal_lm,
    shard_causal_lm_from_pretrained,
)
from malora_dist.runtime.groups import ParallelGroups

TOL = 1e-5
WORLD_SIZES = (1, 2)
GEMMA3 = dict(
    model_type="gemma3_text",
    head_dim=16,
    sliding_window=3,
    layer_types=["sliding_attention", "full_attention"],
    final_logit_softcapping=3.0,
    tie_word_embeddings=True,
)
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
    "qwen3_qk_norm": dict(model_type="qwen3", tie_word_embeddings=False),
    "gemma3_scaled_softcapped": GEMMA3,
    "granite_multipliers": dict(
        model_type="granite",
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
        logits_scaling=2.0,
        tie_word_embeddings=False,
    ),
    "olmo2_gathered_qk_norm": dict(model_type="olmo2", tie_word_embeddings=False),
    "phi3_fused": dict(model_type="phi3", pad_token_id=0, tie_word_embeddings=False),
    # Mixture-of-experts families: their plans split attention (and Qwen3-MoE's dense MLPs) with
    # linear styles, and leave the packed experts replicated on every tp rank.
    "mixtral_experts_replicated": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2,
                                       tie_word_embeddings=False),
    # layer 0 dense (its MLP split by the plan), layer 1 routed (experts replicated)
    "qwen3_moe_experts_replicated": dict(model_type="qwen3_moe", num_local_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, mlp_only_layers=[0], tie_word_embeddings=False),
}
# no base_model_tp_plan: runs at tp=1, refused at tp>1
NO_PLAN = dict(model_type="gpt2", n_embd=64, n_head=4, n_layer=2, vocab_size=256, n_positions=64)
# saved with save_pretrained (transformers 5 always writes safetensors) and loaded slice by slice
SAVED = {"llama_gqa_untied": "20KB", "mistral_sliding_tied": "50GB", "gemma3_scaled_softcapped": "50GB"}
# plan style -> the wrapper's parallel_mode (None: full input and output, to an adapter a plain linear)
MODES = {"colwise": "column", "rowwise": "row", "colwise_gather_output": None, "rowwise_split_input": None}
SEGMENTS = [[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5]


def tiny_model(name: str) -> nn.Module:
    """A tiny HF model with every parameter perturbed, so zero biases and unit norms are tested too."""
    model = build_tiny_causal_lm(NO_PLAN if name == "no_plan" else {**BASE, **MODELS[name]}, seed=0)
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


# evaluation's option trees, two packed in one row (longer than every sliding window here)
TREES = [OptionTree("a", [5, 17, 9, 30, 2, 8], [[11, 4], [7, 40, 3]]),
         OptionTree("b", [6, 1, 22, 13, 9], [[50], [2, 33]])]


def option_reference(hf_model: nn.Module) -> list[float]:
    """Summed log-probability of each option after its prompt, one plain HF forward per option."""
    scores = []
    for tree in TREES:
        for option in tree.options:
            ids = torch.tensor([tree.prompt + option])
            logprobs = hf_model(ids).logits[0, len(tree.prompt) - 1:-1].log_softmax(-1)
            scores.append(logprobs.gather(-1, torch.tensor(option)[:, None]).sum().item())
    return scores


def planned_linears(model: nn.Module) -> dict[str, str]:
    """{path in decoder layer 0: plan style} of the linears the model's plan splits."""
    plan = model.config.base_model_tp_plan
    return {
        path.removeprefix("layers.*."): style for path, style in plan.items() if style in MODES
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


class _Passthrough(nn.Module):
    """Stands in for an adapter: keeps the wrapper as ``base_layer`` and calls only it."""

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x):
        return self.base_layer(x)


def _model_cases(model, data, name) -> dict:
    out = {}
    ids, labels = data["input_ids"], data["labels"]
    out["all_frozen"] = not any(p.requires_grad for p in model.parameters())
    layer = model.model.layers[0]
    out["interface"] = {}
    for path in planned_linears(model):
        proj = layer.get_submodule(path)
        out["interface"][path] = (
            proj.parallel_mode, proj.in_features, proj.out_features, tuple(proj.weight.shape),
            proj.tp_size, proj.tp_rank, proj.tp_group.size(),
        )  # fmt: skip
    local = model(ids)
    out["local_shape"] = tuple(local.shape)
    out["logits"] = model.gather_logits(local)
    out["token_losses"] = model.token_losses(local, labels).detach()
    out["segment_logits"] = model.gather_logits(model(ids, position_ids=data["position_ids"]))
    out["generate"] = model.generate(ids[:1, :5], 8, eos_token_id=model.config.eos_token_id)
    (batch,) = tree_batches(TREES, row_tokens=64, rows_per_batch=1)
    assert batch.input_ids.shape[0] == 1
    by_option = dict(zip(batch.options, score_batch(model, batch, "cpu").tolist()))
    out["option_scores"] = [by_option[(t.key, j)] for t in TREES for j in range(len(t.options))]

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
        for lyr in model.model.layers:
            for path in planned_linears(model):
                parent, _, leaf = path.rpartition(".")
                module = lyr.get_submodule(parent)
                setattr(module, leaf, _Passthrough(getattr(module, leaf)))
        out["wrapped_logits"] = model.gather_logits(model(ids))
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
        results[name] = _model_cases(shard_causal_lm(tiny_model(name), groups), data, name)
    if tp == 1:
        model = shard_causal_lm(tiny_model("no_plan"), groups)
        results["no_plan"] = model.gather_logits(model(data["input_ids"]))
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
        ref["generate"] = hf_model.generate(  # the uncached reference for the cached TP generation
            ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=8, do_sample=False,
            use_cache=False,
        )
        ref["option_scores"] = option_reference(hf_model)
        ref["linears"] = {
            path: (m.in_features, m.out_features)
            for path, m in ((p, hf_model.model.layers[0].get_submodule(p)) for p in planned_linears(hf_model))
        }
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
def test_evaluation_tree_scores_match_hf(worlds, references, tp, name):
    """Option trees under one custom mask (sliding windows narrowed by position) = separate runs."""
    expected = torch.tensor(references[name]["option_scores"], dtype=torch.float64)
    for result in worlds[tp]:
        assert rel_err(torch.tensor(result[name]["option_scores"]), expected) <= TOL


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
def test_projection_interface(worlds, references, tp, name):
    styles = planned_linears(tiny_model(name))
    assert set(worlds[tp][0][name]["interface"]) == set(references[name]["linears"]) == set(styles)
    for rank, result in enumerate(worlds[tp]):
        assert result[name]["all_frozen"]
        for path, style in styles.items():
            n_in, n_out = references[name]["linears"][path]
            local = (n_out // tp, n_in) if style.startswith("colwise") else (n_out, n_in // tp)
            assert result[name]["interface"][path] == (MODES[style], n_in, n_out, local, tp, rank, tp), path


@pytest.mark.slow
@pytest.mark.parametrize("tp", WORLD_SIZES)
def test_adapter_wrapping_and_copied_weights(worlds, references, tp):
    ref = references["llama_gqa_untied"]["logits"]
    for result in worlds[tp]:
        res = result["llama_gqa_untied"]
        assert torch.equal(res["wrapped_logits"], res["logits"])
        assert rel_err(res["logits"], ref) <= TOL


@pytest.mark.slow
def test_model_without_plan_runs_at_tp1(worlds):
    reference = tiny_model("no_plan")(inputs()["input_ids"]).logits.detach()
    assert rel_err(worlds[1][0]["no_plan"], reference) <= TOL


# A plan with styles the base does not implement, written here so that the refusal is tested
# whatever plans a transformers release ships (mixtral's listed packed experts until 5.24).
PACKED_PLAN = {"layers.*.self_attn.q_proj": "colwise", "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
               "layers.*.mlp.experts": "moe_tp_experts"}
PLAN_REFUSALS = [
    # (HF config, tp, message fragments)
    (NO_PLAN, 2, ["gpt2 config has no base_model_tp_plan", "parallel.tp: 1"]),
    (dict(model_type="llama", base_model_tp_plan=PACKED_PLAN), 2,
     ["'packed_colwise' on layers.*.mlp.experts.gate_up_proj", "'moe_tp_experts' on layers.*.mlp.experts"]),
]  # fmt: skip


@pytest.mark.parametrize("fields,tp,fragments", PLAN_REFUSALS)
def test_plan_refusals(fields, tp, fragments):
    from transformers import AutoConfig

    fields = dict(fields)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    check_plan(config, 1)  # tp=1 needs no plan
    with pytest.raises(ValueError) as err:
        check_plan(config, tp)
    for fragment in fragments:
        assert fragment in str(err.value)


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
    with pytest.raises(OSError,
                       match="(?s)could not download 'malora-dist/no-such-model'.*pass a local directory.*GGUF"):
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
