"""Expert parallelism against the single-process layer, in real multi-process gloo worlds.

One world per world size runs every case; the tests check its results. Each case compares outputs,
input gradients and the gradient of every trainable parameter (summed by the reduction rules) with
the single-process layer on the same global batch, then takes an AdamW step and checks replicas.
The balance loss is over each rank's tokens, a micro-batch of its own, as in training; the
reference runs the single-process layer once per micro-batch. A few cases instead split one
micro-batch over the ranks (its counts all-reduced over them, as a layout that splits sequences
would), against the single-process layer on the whole batch at once.
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from reference import adapter_params, randomize_adapter_, rel_err
from world import run_world

from malora_dist.adapters.gating import finish_router_losses
from malora_dist.adapters.layer import AdapterLinear
from malora_dist.adapters.tags import is_ep_sharded
from malora_dist.config.adapter import AdapterConfig
from malora_dist.parallel.adapter_files import adapter_state, load_adapter_state
from malora_dist.parallel.gradients import global_grad_norm, reduce_gradients
from malora_dist.parallel.parallelize import build_adapters
from malora_dist.parallel.placement import measure_link
from malora_dist.parallel.sharding import full_tensor
from malora_dist.runtime.groups import ParallelGroups

pytestmark = pytest.mark.slow  # multi-process worlds (the fast tier: pytest -m "not slow")

N_IN, N_OUT, RANK, EXPERTS = 12, 10, 2, 4  # MALoRA: d = 4, r̄ = 3
BALANCE_COEF = 0.1


@dataclass
class Case:
    name: str
    method: str
    top_k: int
    ep: int
    tokens: list  # tokens per dp rank (the global batch is their concatenation)
    route_to: Optional[list] = None  # force every token onto these experts
    capacity_factor: Optional[float] = None
    normalize: bool = False
    placement: str = "ep"
    extra: dict = field(default_factory=dict)  # the baseline and ablation keys (freeze, identical_init, ...)
    shared_slice: bool = False  # the ranks' tokens form one micro-batch (the router's slice_group)

    @property
    def world(self):
        return len(self.tokens)


def _cases():
    cases = []
    for method in ("malora", "molora"):
        for top_k in (1, 2):
            cases.append(Case(f"{method}-k{top_k}-ep2", method, top_k, 2, [5, 7]))
            cases.append(Case(f"{method}-k{top_k}-ep4", method, top_k, 4, [3, 4, 5, 2]))
            cases.append(Case(f"{method}-k{top_k}-dp4ep2", method, top_k, 2, [4, 2, 3, 6]))
        cases += [Case(f"{method}-k2-ep2-one-micro-batch", method, 2, 2, [5, 7], shared_slice=True),
                  Case(f"{method}-k1-dp4ep2-one-micro-batch", method, 1, 2, [4, 2, 3, 6], shared_slice=True)]
        cases += [
            Case(f"{method}-all-to-one-ep2", method, 1, 2, [4, 5], route_to=[0]),
            Case(f"{method}-all-to-last-rank-k2-ep4", method, 2, 4, [2, 3, 1, 2], route_to=[3, 2]),
            Case(f"{method}-empty-rank-ep2", method, 2, 2, [0, 6]),
            Case(f"{method}-one-token-ep2", method, 2, 2, [1, 3], normalize=True),
            Case(f"{method}-capacity-ep2", method, 1, 2, [6, 6], route_to=[1], capacity_factor=1.0),
            Case(f"{method}-replicate-dp2", method, 2, 2, [5, 7], placement="replicate"),
            Case(f"{method}-replicate-dp4ep2", method, 1, 2, [4, 2, 3, 6], placement="replicate"),
            Case(f"{method}-auto-dp4ep2", method, 2, 2, [4, 2, 3, 6], placement="auto"),
        ]
    # Baselines and ablations (configurations of the same layer) in the ep=2 and dp=4×ep=2 worlds.
    cases += [
        Case("moasylora-k2-ep2", "molora", 2, 2, [5, 7], extra=dict(freeze=["expert_down"])),
        Case("molora-identical-init-k2-ep2", "molora", 2, 2, [5, 7], extra=dict(identical_init=True)),
        Case("malora-fixed-shared-A-k2-ep2", "malora", 2, 2, [5, 7], extra=dict(freeze=["shared_A"])),
        Case("malora-frozen-P-k2-dp4ep2", "malora", 2, 2, [4, 2, 3, 6], extra=dict(freeze=["expert_down"])),
        Case("hydralora-k2-ep2", "hydralora", 2, 2, [5, 7]),
        Case("hydralora-k1-dp4ep2", "hydralora", 1, 2, [4, 2, 3, 6]),
        Case("malora-per-expert-subspace-k2-ep2", "malora", 2, 2, [5, 7], extra=dict(subspace="per_expert")),
        Case("malora-per-expert-subspace-k1-dp4ep2", "malora", 1, 2, [4, 2, 3, 6], extra=dict(subspace="per_expert")),
        Case("malora-shared-B-k2-ep2", "malora", 2, 2, [5, 7], extra=dict(shared_side="up")),
        Case("malora-shared-B-k1-dp4ep2", "malora", 1, 2, [4, 2, 3, 6], extra=dict(shared_side="up")),
        Case("malora-shared-B-empty-rank-ep2", "malora", 2, 2, [0, 6], extra=dict(shared_side="up")),
    ]
    return cases


CASES = _cases()


def case_config(case):
    return AdapterConfig(method=case.method, rank=RANK, num_experts=EXPERTS, top_k=case.top_k,
                         normalize_gates=case.normalize, capacity_factor=case.capacity_factor,
                         balance_loss_coef=BALANCE_COEF, target_modules=["proj"], **case.extra)


def base_linear():
    torch.manual_seed(0)
    return nn.Linear(N_IN, N_OUT, bias=False)


def build_reference(case):
    layer = AdapterLinear(base_linear(), case_config(case), name="proj")
    gen = torch.Generator().manual_seed(1)
    randomize_adapter_(layer, gen)
    total = sum(case.tokens)
    x = torch.rand(total, N_IN, generator=gen) + 0.05
    if case.route_to:
        with torch.no_grad():
            for boost, expert in zip((8.0, 6.0), case.route_to):
                layer.router.weight[expert] = boost
    return layer, x, torch.randn(total, N_OUT, generator=gen)


def kept_slot_mask(case, layer, x):
    """Which (token, expert) slots survive the capacity limit, computed independently per source rank."""
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    _, top = torch.topk(probs, case.top_k, -1)
    keep = torch.zeros_like(probs)
    start = 0
    for tokens in case.tokens:
        capacity = math.ceil(case.capacity_factor * tokens * case.top_k / EXPERTS)
        used = [0] * EXPERTS
        for t in range(start, start + tokens):
            for e in top[t].tolist():
                if used[e] < capacity:
                    keep[t, e] = 1.0
                    used[e] += 1
        start += tokens
    return keep


def balance_of(layer):
    """The balance loss of the layer's last forward (all-reduces its counts over the router's
    slice_group where it has one: every rank of it calls it)."""
    return finish_router_losses([layer.router_stats])[0].balance


def micro_batches(case):
    """The token ranges the balance loss is taken over: each rank's tokens, or all of them at once."""
    bounds = [0] + [sum(case.tokens[:i + 1]) for i in range(case.world)]
    if case.shared_slice:
        return [slice(0, bounds[-1])]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def reference_run(case):
    layer, x, grad_out = build_reference(case)
    x = x.clone().requires_grad_()
    if case.capacity_factor is None:  # one forward per micro-batch, each adding its balance loss
        outs, loss = [], 0.0
        for part in micro_batches(case):
            outs.append(layer(x[part]))
            loss = loss + (outs[-1] * grad_out[part]).sum() + BALANCE_COEF * balance_of(layer)
        out = torch.cat(outs)
        dropped = 0
    else:  # the single-process layer would apply one global capacity: use the dense formula instead
        keep = kept_slot_mask(case, layer, x.detach())
        params = adapter_params(layer)
        probs = torch.softmax(x @ params["router.weight"].t(), -1)
        masked = {**params, "router.weight": params["router.weight"]}
        out = _dense_with_mask(x, layer, masked, keep, case)
        loss = (out * grad_out).sum()
        dropped = int(sum(case.tokens) * case.top_k - keep.sum())
        del probs
    loss.backward()
    grads = {n: p.grad.clone() for n, p in adapter_params(layer).items() if p.requires_grad}
    return layer, out.detach(), x.grad.clone(), grads, dropped


def _dense_with_mask(x, layer, params, keep, case):
    probs = torch.softmax(x @ params["router.weight"].t(), -1)
    values, index = torch.topk(probs, case.top_k, -1)
    gates = torch.zeros_like(probs).scatter(1, index, values) * keep
    z = x @ params["shared_A"].t() if "shared_A" in params else x
    eq = "td,erd->ter" if "shared_A" in params else "tn,ern->ter"
    h = torch.einsum(eq, z, params["expert_down"])
    return x @ layer.base_layer.weight.t() + layer.scaling * torch.einsum(
        "te,tem->tm", gates, torch.einsum("ter,emr->tem", h, params["expert_up"]))


def ref_layer_copy(case):
    """The reference layer's randomised tensors (a fresh build: the reference itself trains)."""
    return build_reference(case)[0]


def distributed_run(case, groups):
    ref_layer, ref_out, ref_x_grad, ref_grads, ref_dropped = reference_run(case)
    _, x_all, grad_all = build_reference(case)
    link = measure_link(groups.ep_group, torch.device("cpu"), groups.dp_group) if case.placement == "auto" else None
    model = nn.ModuleDict({"proj": base_linear()})
    # A rank builds only its own experts; at init they must equal the full build's (same seed and name).
    decisions = build_adapters(model, case_config(case), groups, placement=case.placement,
                               tokens_per_rank=case.tokens[dist.get_rank()], link=link)
    layer = model["proj"]
    if case.shared_slice:
        layer.router.slice_group = groups.dp_group
    full_build = dict(AdapterLinear(base_linear(), case_config(case), name="proj").adapter_tensors())
    init_gap = {n: (full_tensor(p, groups) - full_build[n]).abs().max().item() for n, p in layer.adapter_tensors()}
    load_adapter_state(model, adapter_state(nn.ModuleDict({"proj": ref_layer_copy(case)})), groups)
    rank = dist.get_rank()
    start = sum(case.tokens[:rank])
    local = slice(start, start + case.tokens[rank])
    x = x_all[local].clone().requires_grad_()
    out = layer(x)
    loss = (out * grad_all[local]).sum()
    if case.capacity_factor is None:
        loss = loss + BALANCE_COEF * balance_of(layer)
    loss.backward()
    params = [(n, p) for n, p in adapter_params(layer).items() if p.requires_grad]
    frozen = [(n, p) for n, p in adapter_params(layer).items() if not p.requires_grad]
    assert {n for n, _ in frozen} == set(case_config(case).frozen_parts)
    reduce_gradients([p for _, p in params], groups)

    result = {
        "out": rel_err(out.detach(), ref_out[local]) if out.numel() else 0.0,
        "x_grad": rel_err(x.grad, ref_x_grad[local]) if x.numel() else 0.0,
        "grads": {n: rel_err(full_tensor(p, groups, p.grad), ref_grads[n]) for n, p in params},
        "grad_norm": (global_grad_norm([p for _, p in params], groups).item(),
                      torch.sqrt(sum(g.double().pow(2).sum() for g in ref_grads.values())).item()),
        "dropped": layer.traffic.dropped_slots,
        "ref_dropped": ref_dropped,
        "traffic": layer.traffic.as_dict(),
        "init_gap": init_gap,
        "local_expert_bytes": sum(p.numel() * p.element_size() for n, p in layer.adapter_tensors()
                                  if n.startswith("expert")),
        "local_slots": case.tokens[rank] * case.top_k,
        "decisions": decisions,
    }
    # One AdamW step on both sides: the full parameters must agree, and replicas must be identical.
    torch.optim.AdamW([p for _, p in params], lr=0.01).step()
    torch.optim.AdamW(list(adapter_params(ref_layer).values()), lr=0.01).step()
    ref_after = adapter_params(ref_layer)
    result["after_step"] = {n: rel_err(full_tensor(p, groups), ref_after[n].detach()) for n, p in params + frozen}
    result["frozen_grads"] = [n for n, p in frozen if p.grad is not None]
    replica_gap = {}
    for n, p in params:
        group = groups.edp_group if is_ep_sharded(p) else groups.dp_group
        size = groups.edp if is_ep_sharded(p) else groups.dp
        copies = [torch.empty_like(p) for _ in range(size)]
        if group is None:
            copies = [p.detach()]
        else:
            dist.all_gather(copies, p.detach().contiguous(), group=group)
        replica_gap[n] = max((c - copies[0]).abs().max().item() for c in copies)
    result["replica_gap"] = replica_gap
    return result


def world_main(cases):
    results = {}
    layouts = {}
    for case in cases:
        key = case.ep
        if key not in layouts:
            layouts[key] = ParallelGroups.build(tp=1, ep=case.ep, num_experts=EXPERTS)
        results[case.name] = distributed_run(case, layouts[key])
    return results


@pytest.fixture(scope="module")
def world_results():
    results = {}
    for size in sorted({c.world for c in CASES}):
        per_rank = run_world(size, world_main, [c for c in CASES if c.world == size])
        for name in per_rank[0]:
            results[name] = [r[name] for r in per_rank]
    return results


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process_layer(world_results, case):
    for rank, result in enumerate(world_results[case.name]):
        assert result["out"] <= 1e-5, (rank, result["out"])
        assert result["x_grad"] <= 1e-5, (rank, result["x_grad"])
        for name, err in result["grads"].items():
            assert err <= 1e-5, (rank, name, err)
        norm, ref_norm = result["grad_norm"]
        assert norm == pytest.approx(ref_norm, rel=1e-5)
        for name, err in result["after_step"].items():
            assert err <= 1e-5, (rank, "after AdamW", name, err)
        assert result["frozen_grads"] == [], (rank, "frozen parts got gradients", result["frozen_grads"])
        for name, gap in result["replica_gap"].items():
            assert gap == 0.0, (rank, "replicas differ", name, gap)
        for name, gap in result["init_gap"].items():
            assert gap == 0.0, (rank, "built for the layout, initial values differ from the full build", name, gap)


@pytest.mark.parametrize("case", [c for c in CASES if c.placement == "ep" and c.world == c.ep], ids=lambda c: c.name)
def test_a_rank_allocates_only_its_experts(world_results, case):
    full = AdapterLinear(base_linear(), case_config(case), name="proj")
    full_bytes = sum(p.numel() * p.element_size() for n, p in full.adapter_tensors() if n.startswith("expert"))
    for result in world_results[case.name]:
        assert result["local_expert_bytes"] * case.ep == full_bytes


@pytest.mark.parametrize("case", [c for c in CASES if c.placement == "replicate"], ids=lambda c: c.name)
def test_replicated_experts_exchange_nothing(world_results, case):
    for r in world_results[case.name]:
        assert r["traffic"]["dispatch_bytes"] == r["traffic"]["combine_bytes"] == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.placement == "auto"], ids=lambda c: c.name)
def test_auto_placement_decides_the_same_on_every_rank(world_results, case):
    decisions = [r["decisions"] for r in world_results[case.name]]
    assert all(d == decisions[0] for d in decisions) and set(decisions[0].values()) <= {"ep", "replicate"}


@pytest.mark.parametrize("case", [c for c in CASES if c.capacity_factor], ids=lambda c: c.name)
def test_capacity_drops_are_counted(world_results, case):
    results = world_results[case.name]
    assert sum(r["dropped"] for r in results) == results[0]["ref_dropped"] > 0


@pytest.mark.parametrize("case", [c for c in CASES if c.capacity_factor is None and c.placement == "ep"],
                         ids=lambda c: c.name)
def test_traffic_matches_closed_form(world_results, case):
    width = {"malora": int(0.5 * RANK * EXPERTS), "molora": N_IN, "hydralora": RANK}[case.method]
    back = N_OUT
    if case.extra.get("subspace") == "per_expert":
        width = N_IN  # each expert applies its own S_t: x travels
    if case.extra.get("shared_side") == "up":
        width, back = N_IN, int(0.5 * RANK * EXPERTS)  # x travels, d comes back (S_B applies after)
    results = world_results[case.name]
    for r in results:
        assert r["traffic"]["dispatch_bytes"] == r["local_slots"] * width * 4
        assert r["traffic"]["count_exchange_bytes"] == EXPERTS * 8
    groups_of_ep = [results[i:i + case.ep] for i in range(0, len(results), case.ep)]
    for ep_group in groups_of_ep:
        slots = sum(r["local_slots"] for r in ep_group)
        assert sum(r["traffic"]["combine_bytes"] for r in ep_group) == slots * back * 4
