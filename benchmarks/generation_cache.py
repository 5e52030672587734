"""Greedy generation on the tensor-parallel base with HF's KV cache against without it (SmolLM2, tp=1).

Both runs decode the same chat prompt (whose answer is longer than 64 tokens) for up to
``--new-tokens`` tokens; the script checks that they produce the same tokens and prints the times,
the number of tokens generated and the speed-up. Usage:
``python benchmarks/generation_cache.py [--new-tokens 64] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from malora_dist.models import load_hf_model, load_tokenizer, shard_causal_lm, smollm2_gguf_path
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.local_world import run_local_world

PROMPT = "Explain in a few sentences why the sky is blue."


def _seconds(model, input_ids, new_tokens: int, use_cache: bool, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(input_ids, new_tokens, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return best, out


def _measure(new_tokens: int, repeats: int) -> dict:
    tokenizer = load_tokenizer(smollm2_gguf_path())
    input_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                              return_tensors="pt", return_dict=True)["input_ids"]
    groups = ParallelGroups.build(tp=1)
    model = shard_causal_lm(load_hf_model(smollm2_gguf_path()), groups)
    cached, with_cache = _seconds(model, input_ids, new_tokens, True, repeats)
    uncached, without_cache = _seconds(model, input_ids, new_tokens, False, repeats)
    groups.destroy()
    return {"prompt_tokens": input_ids.shape[1], "new_tokens": with_cache.shape[1] - input_ids.shape[1],
            "cached_s": cached, "uncached_s": uncached, "same_tokens": torch.equal(with_cache, without_cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    args = parser.parse_args()
    result = run_local_world(1, _measure, args.new_tokens, args.repeats)[0]
    print(f"SmolLM2-135M, tp=1, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens "
          f"(best of {args.repeats}): KV cache {result['cached_s']:.2f} s, without {result['uncached_s']:.2f} s, "
          f"speed-up ×{result['uncached_s'] / result['cached_s']:.1f}; same tokens: {result['same_tokens']}")
    if not result["same_tokens"]:
        raise SystemExit("the cached and uncached generations differ")


if __name__ == "__main__":
    main()
