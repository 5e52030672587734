"""Expert-parallel layers that read the same input share one exchange (q/k/v; gate/up).

A real 2-process gloo world (ep=2) builds a tiny two-block LLaMA with the paper's six targets
(q, k, v, gate, up, down) three ways on each rank: with the shared exchanges (the default), with
one exchange per layer (``share_exchanges=False``, the path the single-layer expert-parallel tests
hold against the single-process layer), and in the single-process layout (no exchange at all), with
dropout 0.05 from the layout-free context. The tests check that the shared path gives the
per-layer path's logits and the gradient of every parameter, the single-process logits, and its
collectives and host reads per decoder block per micro-batch, counted where they happen: every
collective op that reaches torch's dispatcher (forward and backward) and every ``Tensor.tolist``.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from world import run_world

from malora_dist.adapters.dropout import DropoutContext, set_dropout_context, token_places
from malora_dist.adapters.inject import adapter_layers, auxiliary_loss
from malora_dist.config.adapter import AdapterConfig
from malora_dist.models import build_tiny_causal_lm, shard_causal_lm
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.runtime.groups import ParallelGroups

pytestmark = pytest.mark.slow  # a multi-process world

MODEL = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=48, vocab_size=64, max_position_embeddings=32)
SIX_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = {
    "malora": dict(method="malora", rank=4, num_experts=4, top_k=2),
    "molora": dict(method="molora", rank=4, num_experts=4, top_k=2),
    "malora_shared_up": dict(method="malora", rank=4, num_experts=4, top_k=2, shared_side="up"),
}
ROWS, SEQ = 2, 10  # sequences per rank, tokens per sequence
BLOCKS = MODEL["num_hidden_layers"]


def adapter_config(name: str) -> AdapterConfig:
    return AdapterConfig.from_dict(dict(METHODS[name], dropout=0.05, target_modules=SIX_TARGETS,
                                        balance_loss_coef=0.01, router_z_loss_coef=0.001))


def give_experts_values(model) -> None:
    """Zero-initialised expert matrices (B̄_t, or Ā_t with S_B) would hide the exchange: give every
    expert values that depend only on (layer, part, global expert), as a full build would hold."""
    for name, layer in adapter_layers(model):
        for part, param in (("down", layer.expert_down), ("up", layer.expert_up)):
            generator = torch.Generator().manual_seed(zlib.crc32(f"{name}.{part}".encode()))
            full = 0.3 * torch.randn((layer.num_experts, *param.shape[1:]), generator=generator, dtype=torch.float64)
            with torch.no_grad():
                param.copy_(full[layer.expert_offset:layer.expert_offset + layer.num_local_experts])


class Exchanges(TorchDispatchMode):
    """Counts the all-to-all collectives that reach the dispatcher, forward and backward (the
    auxiliary loss's all-reduce of routing counts is not an exchange)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).split(".")[1] in ("alltoall_base_", "all_to_all_single"):
            self.count += 1
        return func(*args, **(kwargs or {}))


class HostReads:
    """Counts ``Tensor.tolist`` calls (how split sizes reach the host) while entered."""

    def __enter__(self):
        self.count, self._original = 0, torch.Tensor.tolist

        def counted(tensor):
            self.count += 1
            return self._original(tensor)

        torch.Tensor.tolist = counted
        return self

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._original


def _context(rank: int) -> DropoutContext:
    return DropoutContext(seed=3, step=1, token_place=token_places(rank * ROWS, ROWS, SEQ))


def _run(model, ids, rank):
    set_dropout_context(model, _context(rank))
    with Exchanges() as exchanges, HostReads() as reads:
        logits = model(ids)
        loss = logits.pow(2).mean() + auxiliary_loss(model)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads, exchanges.count, reads.count


def _model(groups, name: str, placement: str):
    model = shard_causal_lm(build_tiny_causal_lm(MODEL, seed=0).double(), groups)
    build_adapters(model, adapter_config(name), groups, placement=placement, seed=0)
    give_experts_values(model)
    return model


def _world():
    rank = torch.distributed.get_rank()
    groups = ParallelGroups.build(tp=1, ep=2)
    ids = torch.randint(0, MODEL["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(10 + rank))
    results = {}
    for name in METHODS:
        runs = {}
        for share in (True, False):
            model = _model(groups, name, "ep")
            if not share:
                for _, layer in adapter_layers(model):
                    layer.siblings = None
            runs[f"members_{share}"] = sum(layer.siblings is not None for _, layer in adapter_layers(model))
            runs[share] = _run(model.train(), ids, rank)
        # every expert on this rank: no exchange at all
        single = _model(groups, name, "replicate").train()
        set_dropout_context(single, _context(rank))
        runs["single_logits"] = single(ids).detach()
        results[name] = runs
    # a sibling called alone with another input runs the group again and gets its own answer
    model = _model(groups, "malora", "ep").eval()
    attention = model.model.layers[0].self_attn
    x = torch.randn(ROWS, SEQ, MODEL["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        q_then_v = attention.v_proj(attention.q_proj(x) * 0 + x.clone())  # v's input is another tensor
        v_alone = attention.v_proj(x.clone())
    results["other_input"] = (q_then_v, v_alone)
    groups.destroy()
    return results


@pytest.fixture(scope="module")
def world():
    return run_world(2, _world)


@pytest.mark.parametrize("name", METHODS)
def test_shared_exchange_equals_one_exchange_per_layer(world, name):
    for rank, result in enumerate(world):
        shared, per_layer = result[name][True], result[name][False]
        assert result[name]["members_True"] == 5 * BLOCKS and result[name]["members_False"] == 0
        torch.testing.assert_close(shared[0], per_layer[0], rtol=1e-12, atol=1e-12)
        assert shared[1].keys() == per_layer[1].keys() and len(shared[1]) > 0
        for key in shared[1]:
            torch.testing.assert_close(shared[1][key], per_layer[1][key], rtol=1e-12, atol=1e-12, msg=key)
        # against every expert on this rank (no exchange; other kernels, so other summation orders
        # in the fp32 base): the contract's fp32 tolerance
        single = result[name]["single_logits"]
        assert ((shared[0] - single).norm() / single.norm()).item() <= 1e-5


# Rows that carry no gradient skip their backward all-to-all: MoLoRA and the S_B variant send drop(x)
# itself, and block 0's input (the frozen embeddings) needs none, so its q/k/v exchanges skip one
# collective each (3 per layer, 1 shared); MALoRA sends S_A x, which always does.
SKIPPED_IN_BLOCK_0 = {"malora": (0, 0), "molora": (3, 1), "malora_shared_up": (3, 1)}


@pytest.mark.parametrize("name", METHODS)
def test_collectives_and_host_reads_per_decoder_block(world, name):
    """Six targets, ep=2, one micro-batch: one exchange per layer is 6 × 5 = 30 collectives and 6 host
    reads per block; with q/k/v and gate/up sharing theirs, 3 × 5 = 15 and 3."""
    per_layer_skipped, shared_skipped = SKIPPED_IN_BLOCK_0[name]
    for result in world:
        shared, per_layer = result[name][True], result[name][False]
        assert (per_layer[2] + per_layer_skipped, per_layer[3]) == (30 * BLOCKS, 6 * BLOCKS)
        assert (shared[2] + shared_skipped, shared[3]) == (15 * BLOCKS, 3 * BLOCKS)


def test_a_sibling_called_with_another_input_runs_on_it(world):
    for result in world:
        q_then_v, v_alone = result["other_input"]
        torch.testing.assert_close(q_then_v, v_alone, rtol=1e-12, atol=1e-12)


def test_auto_placement_prices_an_exchange_shared_by_its_siblings():
    """The cost model splits a shared exchange's collectives over the layers that share it (q/k/v:
    3, gate/up: 2, only those targeted); each layer still moves its own bytes."""
    from malora_dist.adapters.siblings import exchange_members
    from malora_dist.parallel.placement import LinkModel, placement_costs

    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert [exchange_members(f"model.layers.0.x.{leaf}", targets) for leaf in targets] == [3, 3, 3, 2, 2, 1]
    assert exchange_members("model.layers.0.self_attn.q_proj", ["q_proj", "down_proj"]) == 1
    config = AdapterConfig(method="malora", rank=4, num_experts=4, top_k=2)
    alone, shared = (placement_costs(config, 32, 32, 64, 2, 2, LinkModel(1e-3, 1e9), exchange_members=k)
                     for k in (1, 3))
    assert shared.exchange_terms.collectives * 3 == pytest.approx(alone.exchange_terms.collectives)
    assert shared.exchange_terms.link_bytes == alone.exchange_terms.link_bytes
    assert shared.exchange_s < alone.exchange_s
