"""Predicted seconds of one optimizer step on a described machine, split by phase.

Parts and where their costs come from:

- forward / backward compute of the whole model (frozen base, attention, adapters with their
  experts local, the loss): the ATen ops of the real model counted on the meta device
  (``work.count_phase``), each priced at its roofline on the machine (FLOPs at peak, bytes at the
  memory's rate, whichever is slower) plus the machine's fixed cost per op;
- tensor-parallel collectives (the base's and the adapters' reductions): the ``c10d`` ops the
  same forward and backward issue, each a ring all-reduce (latency + 2(p−1)/p · bytes / bandwidth)
  on the link its group spans (within a node or across);
- the expert exchange of layers whose experts are split: the dispatcher's own terms
  (``AllToAllDispatch.link_terms``) and the grouped experts' extra local work over the dense local
  kernel (``parallel.placement.layer_work``), exactly as the ``auto`` placement prices them, with
  an exchange that siblings share (q/k/v, gate/up: ``adapters/siblings.py``) priced once for the
  group — its collectives split over the layers that share it, as the built model groups them;
- the gradient all-reduce: replicated trainable tensors over dp, ep-sharded experts over the
  expert-data-parallel group (``parallel.gradients.reduce_gradients``), plus the step's small
  latency-bound reductions (token count, norm, statistics) and the norm and clipping's own ops
  (counted on meta gradients);
- the optimizer: fused AdamW reading and writing parameter, gradient and two moments.

Overlap: none is assumed. The code runs every phase on the compute path except the forward
send of the exchange, which is in flight while the base computes; the model takes no credit for
it, so where the exchange is large the prediction is an upper bound by up to the base's forward
time per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malora_dist.adapters.dispatch import AllToAllDispatch
from malora_dist.adapters.inject import adapter_layers, adapter_parameters
from malora_dist.adapters.tags import is_ep_sharded
from malora_dist.adapters.variant import AdapterVariant
from malora_dist.parallel.gradients import clip_grad_norm_
from malora_dist.parallel.placement import LinkModel, layer_work
from malora_dist.plan.machine import Machine
from malora_dist.plan.rank_build import meta_batch, micro_batch_loss
from malora_dist.plan.work import PhaseWork, count_phase
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.train.build import DTYPES, placement_inputs

# the trainer's small all-reduces per step: token count, statistics, gradient norm (tp and ep parts)
SMALL_REDUCTIONS_PER_STEP = 4
# fused AdamW per number: reads parameter, gradient, two moments; writes parameter, two moments (fp32)
ADAMW_BYTES_PER_NUMBER = 7 * 4


@dataclass
class StepPrediction:
    forward_s: float
    backward_s: float
    exchange_s: float
    all_reduce_s: float
    optimizer_s: float
    tokens_per_step: int

    @property
    def step_s(self) -> float:
        return self.forward_s + self.backward_s + self.exchange_s + self.all_reduce_s + self.optimizer_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    def to_dict(self) -> dict:
        return dict(forward_s=self.forward_s, backward_s=self.backward_s, exchange_s=self.exchange_s,
                    all_reduce_s=self.all_reduce_s, optimizer_s=self.optimizer_s, step_s=self.step_s,
                    tokens_per_s=self.tokens_per_s)


def span(ranks) -> int:
    return max(ranks) - min(ranks) + 1 if ranks else 1


def all_reduce_s(machine: Machine, size: int, span_ranks: int, nbytes: float) -> float:
    if size <= 1:
        return 0.0
    latency, bandwidth = machine.link(span_ranks)
    return latency + 2 * (size - 1) / size * nbytes / bandwidth


def _collectives_s(work: PhaseWork, machine: Machine) -> float:
    return sum(all_reduce_s(machine, len(c.group_ranks), span(c.group_ranks), c.bytes) for c in work.collectives)


def _phase_s(work: PhaseWork, machine: Machine) -> float:
    return work.seconds(machine.peak_flops, machine.memory_bytes_per_s, machine.op_s) + _collectives_s(work, machine)


def count_micro_batch(local_model, config) -> tuple[PhaseWork, PhaseWork]:
    """(forward, backward) work of one micro-batch on a build with every expert local."""
    ids, mask = meta_batch(config)
    local_model.train()
    holder = {}
    forward = count_phase(lambda: holder.update(loss=micro_batch_loss(local_model, ids, mask)))
    backward = count_phase(lambda: holder["loss"].backward())
    return forward, backward


def group_spans(groups) -> dict:
    """Rank spans of the ep, dp and edp groups in megatron's layout (tp innermost, then ep, then dp)."""
    tp, ep, dp = groups.tp, groups.ep, groups.dp
    return {"ep": (ep - 1) * tp + 1, "dp": (dp - 1) * tp + 1, "edp": (dp // ep - 1) * tp * ep + 1}


def link_model(machine: Machine, groups) -> LinkModel:
    """The placement's ``LinkModel`` for this machine and layout."""
    spans = group_spans(groups)
    latency, bandwidth = machine.link(spans["ep"])
    return LinkModel(latency, bandwidth, flops_per_s=machine.peak_flops, op_s=machine.op_s,
                     copy_bytes_per_s=machine.memory_bytes_per_s, reduce_bytes_per_s=machine.link(spans["dp"])[1])


def exchange_s(model, decisions: dict, config, groups, machine: Machine) -> float:
    """Per step, the layers with split experts: their all-to-all and their extra dispatch work."""
    link = link_model(machine, groups)
    adapter = config.adapter
    dtype = DTYPES[config.model.dtype]
    tokens_per_rank, micro_batches = placement_inputs(config, groups)
    tokens = max(tokens_per_rank // micro_batches, 1)
    element = torch.empty((), dtype=dtype).element_size()
    total = 0.0
    for name, layer in adapter_layers(model):
        if decisions.get(name) != "ep":
            continue
        n, m = _local_sizes(layer, groups.tp)
        variant = AdapterVariant.of(adapter, n, m)  # at this rank's sizes: its rows' widths
        members = len(layer.siblings.members) if layer.siblings is not None else 1  # sharing one exchange
        terms = AllToAllDispatch.link_terms(tokens * variant.top_k, variant.sent_width, variant.returned_width,
                                            groups.ep, element, members)
        extra = layer_work(adapter, n, m, groups.ep, tokens, dtype).seconds(link) \
            - layer_work(adapter, n, m, 1, tokens, dtype).seconds(link)
        total += terms.seconds(link) + max(extra, 0.0)
    return total * micro_batches


def norm_and_clip_s(params: list, machine: Machine) -> float:
    """The global norm and the clipping (``parallel.gradients.clip_grad_norm_``): ops per parameter,
    counted on meta gradients with no group (its few collectives are priced with the reductions)."""
    grads = [torch.empty_like(p, device="meta") for p in params]
    stand_ins = [torch.empty_like(p, device="meta") for p in params]
    for stand_in, grad in zip(stand_ins, grads):
        stand_in.grad = grad
    work = count_phase(lambda: clip_grad_norm_(stand_ins, 1.0, ParallelGroups()))
    return work.seconds(machine.peak_flops, machine.memory_bytes_per_s, machine.op_s)


def _local_sizes(layer, tp: int) -> tuple[int, int]:
    """(n, m) as this rank holds them: a column-parallel base's output and a row-parallel base's
    input are split over tp, and so are the rows that travel (docs/ARCHITECTURE.md §3.5)."""
    n, m = layer.in_features, layer.out_features
    mode = getattr(layer.base_layer, "parallel_mode", None)
    return (n // tp if mode == "row" else n), (m // tp if mode == "column" else m)


def gradient_all_reduce_s(model, groups, machine: Machine) -> float:
    """Gradient sums over dp / edp (each flattened into one bucket and copied back: 4 bytes moved per
    byte reduced), the step's small reductions, and the norm and clipping."""
    params = adapter_parameters(model)
    spans = group_spans(groups)
    replicated = sum(p.numel() * 4 for p in params if not is_ep_sharded(p))
    experts = sum(p.numel() * 4 for p in params if is_ep_sharded(p))
    small = SMALL_REDUCTIONS_PER_STEP * machine.link(spans["dp"])[0] if groups.world > 1 else 0.0
    flattened = (replicated if groups.dp > 1 else 0) + (experts if groups.edp > 1 else 0)
    return (all_reduce_s(machine, groups.dp, spans["dp"], replicated)
            + all_reduce_s(machine, groups.edp, spans["edp"], experts) + small
            + 4 * flattened / machine.memory_bytes_per_s + norm_and_clip_s(params, machine))


def optimizer_s(model, machine: Machine) -> float:
    params = adapter_parameters(model)
    numbers = sum(p.numel() for p in params)
    return numbers * ADAMW_BYTES_PER_NUMBER / machine.memory_bytes_per_s + len(params) * machine.op_s


def predict_step(model, local_model, decisions: dict, config, groups, machine: Machine,
                 counted=None) -> StepPrediction:
    """``model``: this rank's build; ``local_model``: the same with every expert local (its work is
    counted; ``counted`` reuses a count of it)."""
    forward, backward = counted or count_micro_batch(local_model, config)
    _, micro_batches = placement_inputs(config, groups)
    forward_s = _phase_s(forward, machine)
    # checkpointed layers run their forward again in backward (the loss and head do not: a small excess)
    recompute_s = forward_s if config.train.activation_checkpointing else 0.0
    return StepPrediction(
        forward_s=micro_batches * forward_s,
        backward_s=micro_batches * (_phase_s(backward, machine) + recompute_s),
        exchange_s=exchange_s(model, decisions, config, groups, machine),
        all_reduce_s=gradient_all_reduce_s(model, groups, machine),
        optimizer_s=optimizer_s(model, machine),
        tokens_per_step=config.train.global_batch_size * config.data.seq_len,
    )
