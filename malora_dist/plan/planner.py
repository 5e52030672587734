"""Plan every layout a world size allows: build each distinct rank position for real (meta device,
fake process group), measure what it holds and predict its step; rank the layouts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from malora_dist.config.run import RunConfig
from malora_dist.plan.fake_world import distinct_positions, fake_rank
from malora_dist.plan.machine import Machine
from malora_dist.plan.rank_build import build_rank_model, local_experts_model, rank_memory
from malora_dist.plan.step_time import StepPrediction, count_micro_batch, link_model, predict_step


@dataclass
class LayoutPlan:
    tp: int
    ep: int
    placement: str
    error: Optional[str] = None
    memory: dict = field(default_factory=dict)  # {first rank of a position: RankMemory}
    ranks_per_position: dict = field(default_factory=dict)
    prediction: Optional[StepPrediction] = None
    placements: dict = field(default_factory=dict)  # {"ep": layers, "replicate": layers}

    @property
    def name(self) -> str:
        return f"tp={self.tp} ep={self.ep} {self.placement}"

    def peak_bytes(self, checkpointing: bool) -> int:
        return max(m.total(checkpointing) for m in self.memory.values())


def with_layout(config: RunConfig, tp: int, ep: int, placement: str) -> RunConfig:
    parallel = dataclasses.replace(config.parallel, tp=tp, ep=ep, expert_placement=placement)
    return dataclasses.replace(config, parallel=parallel)


def plan_layout(config: RunConfig, world_size: int, machine: Machine, every_position: bool = True) -> LayoutPlan:
    """Build each distinct rank position of ``config``'s layout (``every_position`` False: rank 0's
    alone — tp and ep split evenly, so every position holds the same shapes; the ranking uses that);
    errors a launch would raise are kept."""
    par = config.parallel
    plan = LayoutPlan(par.tp, par.ep, par.expert_placement)
    try:
        positions = distinct_positions(world_size, par.tp, par.ep) if world_size % par.tp == 0 else {0: world_size}
        if not every_position:
            positions = {0: world_size}
        for rank, count in positions.items():
            experts = config.adapter.num_experts if config.adapter.is_moe else None
            with fake_rank(world_size, rank, par.tp, par.ep, experts) as groups:
                link = link_model(machine, groups)
                model, decisions = build_rank_model(config, groups, link=link)
                first = next(iter(plan.memory.values()), None)
                if first is not None:  # the shapes of the activations are the same at every position
                    plan.memory[rank] = rank_memory(config, model, decisions, None, (
                        first.activation_bytes, first.checkpointed_activation_bytes))
                    plan.ranks_per_position[rank] = count
                    continue
                local = local_experts_model(config, model, decisions, groups)
                plan.memory[rank] = rank_memory(config, model, decisions, local)
                plan.ranks_per_position[rank] = count
                if plan.prediction is None:  # every position does the same work
                    plan.prediction = predict_step(model, local, decisions, config, groups, machine,
                                                   counted=count_micro_batch(local, config))
                    plan.placements = {p: sum(1 for d in decisions.values() if d == p) for p in ("ep", "replicate")}
    except ValueError as err:
        plan.error = str(err)
    return plan


def candidate_layouts(config: RunConfig, world_size: int) -> list[tuple[int, int, str]]:
    """Every (tp, ep, placement) the world size allows; tp at most a node's worth is the caller's to
    filter. Placement only matters at ep > 1 for a mixture of experts."""
    out = []
    for tp in (d for d in range(1, world_size + 1) if world_size % d == 0):
        dp = world_size // tp
        for ep in (d for d in range(1, dp + 1) if dp % d == 0):
            if ep > 1 and not config.adapter.is_moe:
                continue
            if config.adapter.is_moe and config.adapter.num_experts % ep:
                continue
            for placement in (("ep", "replicate") if ep > 1 else ("ep",)):
                out.append((tp, ep, placement))
    return out


def plan_layouts(config: RunConfig, world_size: int, machine: Machine, max_tp: Optional[int] = None,
                 layouts: Optional[list] = None) -> list[LayoutPlan]:
    """Every allowed layout planned, fastest first among those that build and fit the machine."""
    layouts = layouts or candidate_layouts(config, world_size)
    plans = [plan_layout(with_layout(config, tp, ep, placement), world_size, machine, every_position=False)
             for tp, ep, placement in layouts if max_tp is None or tp <= max_tp]
    checkpointing = config.train.activation_checkpointing

    def key(plan: LayoutPlan):
        if plan.error:
            return (2, 0.0)
        fits = plan.peak_bytes(checkpointing) <= machine.memory_bytes
        return (0 if fits else 1, plan.prediction.step_s)

    return sorted(plans, key=key)
