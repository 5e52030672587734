"""The trainer: one optimizer step in named phases (``Trainer.train_step``) and the loop around it
(``Trainer.fit``: resume, steps, metrics, held-out loss, checkpoints, a stop on SIGTERM).

Per optimizer step (docs/ARCHITECTURE.md §5.1 (the loss of a step)): every rank counts its loss
tokens over all its micro-batches and one all-reduce gives the step's global count *before the first
backward*; each micro-batch's loss is its summed token loss over that global count, so summed
gradients equal the single-process gradient whatever the layout, padding or answer masks. The router
losses are taken over each micro-batch (``gating.balance_loss`` says why): a fixed slice of the
global batch, so the same sequences at every layout; the step's auxiliary loss is their mean over all
the step's micro-batches (global_batch_size / micro_batch_size of them, on whichever ranks they lie),
so each rank adds its micro-batches' losses over that count and the summed gradients are the
single-process ones.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from malora_dist.adapters.dropout import DropoutContext, set_dropout_context, token_places
from malora_dist.adapters.inject import adapter_layers, adapter_parameters, auxiliary_loss
from malora_dist.config.run import RunConfig
from malora_dist.parallel.gradients import clip_grad_norm_, reduce_gradients
from malora_dist.runtime.groups import ParallelGroups
from malora_dist.runtime.log import get_logger
from malora_dist.train.checkpoint import CheckpointManager
from malora_dist.train.heldout import HeldOutSet, record_best
from malora_dist.train.metrics_log import MetricsWriter
from malora_dist.train.optim import build_optimizer, build_scheduler
from malora_dist.train.run_info import write_run_info
from malora_dist.train.telemetry import PhaseTimer, Telemetry

IGNORE_INDEX = -100
# Set by the SIGTERM handler of launch/train.py (what SLURM sends before a time limit).
STOP_EVENT = threading.Event()


class NonFiniteError(RuntimeError):
    pass


def loss_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose next-token label counts (the model's token_losses shift the same way)."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return shifted != IGNORE_INDEX


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    grad_norm: float
    skipped: bool
    tokens: int
    lr: float
    times: dict
    task_loss: dict = field(default_factory=dict)


def enter_training_mode(model: nn.Module) -> None:
    """Training mode as a run means it. The frozen base stays in eval mode: dropout of its own (if
    its config has any) would draw rank-dependent masks, where every mask must be layout-free
    (docs/ARCHITECTURE.md §7.3 (dropout)). The adapters train (their dropout is layout-free).
    Decoder layers that recompute in backward (``train.activation_checkpointing``) are marked
    training, themselves only: Hugging Face checkpoints a layer only in training mode, so with the
    base in eval mode the flag would silently do nothing."""
    model.eval()
    for _, layer in adapter_layers(model):
        layer.train()

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


class StepExpertLoad:
    """Slots per expert of every routed layer, summed over a step's micro-batches on this rank; the
    trainer all-reduces them over dp with its other step statistics (no collective of their own),
    which gives the load over the global batch whatever the layout."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.layers = [(name, layer) for name, layer in adapter_layers(model) if layer.config.is_moe]
        self.counts = torch.zeros(sum(layer.num_experts for _, layer in self.layers), dtype=torch.float64,
                                  device=device)

    def add(self) -> None:
        """After ``auxiliary_loss``: add each layer's counts of the micro-batch just run."""
        if self.layers:
            self.counts += torch.cat([layer.expert_load.to(self.counts) for _, layer in self.layers])

    def per_layer(self, summed: list) -> dict:
        """{layer name: slots per expert} from the all-reduced ``counts`` (read back as a list)."""
        out, start = {}, 0
        for name, layer in self.layers:
            out[name] = [int(c) for c in summed[start:start + layer.num_experts]]
            start += layer.num_experts
        return out


@dataclass
class StepTotals:
    """A step's statistics over the global batch, read back from the one all-reduce of ``StepSums``."""
    task_sums: torch.Tensor  # per task: [loss sum, loss tokens]
    lm_sum: float
    aux_sum: float
    input_tokens: float
    expert_load: dict  # adapted layer -> slots per expert
    stop: bool

    def task_loss(self, task_names: list) -> dict:
        """{task: mean token loss} for the tasks with loss tokens in the step."""
        return {name: (self.task_sums[0, i] / self.task_sums[1, i]).item()
                for i, name in enumerate(task_names) if self.task_sums[1, i] > 0}


class StepSums:
    """What this rank's micro-batches of a step add up — per-task loss sums, the lm loss, router
    loss and input tokens, the expert load — packed with the stop flag into one float64 vector, so
    the step's statistics cost one all-reduce over dp."""

    def __init__(self, model: nn.Module, num_tasks: int, device: torch.device):
        self.device = device
        self.num_tasks = num_tasks
        self.task_sums = torch.zeros(2, num_tasks, dtype=torch.float64, device=device)
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)  # [lm loss sum, aux sum, input tokens]
        self.load = StepExpertLoad(model, device)

    @torch.no_grad()
    def add(self, batch: dict, token_losses: torch.Tensor, loss: torch.Tensor, aux: torch.Tensor,
            global_tokens: float) -> None:
        """A micro-batch's share, ``loss`` being its token losses' sum over ``global_tokens``."""
        mask = loss_token_mask(batch["labels"])
        task_ids = batch["task_ids"][mask]
        self.task_sums[0].index_add_(0, task_ids, token_losses.detach()[mask].double())
        self.task_sums[1].index_add_(0, task_ids, torch.ones_like(task_ids, dtype=torch.float64))
        self.totals += torch.stack([loss.detach().double() * global_tokens, aux.detach().double(),
                                    torch.tensor(float(batch["input_ids"].numel()), dtype=torch.float64,
                                                 device=self.device)])

    def packed(self, stop: bool) -> torch.Tensor:
        """The sums and the stop flag (last) in one vector, to all-reduce."""
        return torch.cat([self.task_sums.reshape(-1), self.totals, self.load.counts,
                          torch.tensor([float(stop)], dtype=torch.float64, device=self.device)])

    def unpacked(self, stats: torch.Tensor) -> StepTotals:
        """``packed``'s vector, all-reduced, read back (one host read)."""
        n = self.num_tasks
        lm_sum, aux_sum, input_tokens, *load_counts, stop = stats[2 * n:].tolist()
        return StepTotals(task_sums=stats[: 2 * n].reshape(2, n), lm_sum=lm_sum, aux_sum=aux_sum,
                          input_tokens=input_tokens, expert_load=self.load.per_layer(load_counts), stop=stop > 0)


class Trainer:
    """Trains one run's adapters: ``train_step`` is one optimizer step in its phases, ``fit`` the loop.

    Collaborators come with the constructor, each with a default: ``heldout``, the held-out set
    evaluated every ``train.eval_interval`` steps (None: no held-out loss); ``metrics``, the writer
    of ``metrics.jsonl`` (default: rank 0 writes in ``output_dir``); ``telemetry``, the memory and
    utilisation readings of each metrics row; ``fault_injector`` (tests), a ``callable(step, loss)
    -> loss`` applied to each micro-batch's loss before its backward. The trainer builds its own
    ``checkpoints`` (a ``CheckpointManager`` reads and restores the trainer's state).
    """

    def __init__(self, config: RunConfig, groups: ParallelGroups, device: torch.device, model: nn.Module,
                 data, total_steps: int, output_dir: str, *, heldout: Optional[HeldOutSet] = None,
                 metrics: Optional[MetricsWriter] = None, telemetry: Optional[Telemetry] = None,
                 fault_injector: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None):
        self.config = config
        self.groups = groups
        self.device = device
        self.model = model
        self.data = data
        self.total_steps = total_steps
        self.output_dir = output_dir
        self.params = adapter_parameters(model)
        train = config.train
        self.optimizer = build_optimizer(self.params, train.lr, train.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, total_steps, train.warmup_ratio, train.schedule,
                                         train.min_lr_ratio)
        self.sampler = data.sampler(train.global_batch_size)
        self.step = 0  # optimizer steps done
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.is_logger = dist.get_rank() == 0
        self.metrics = metrics if metrics is not None else MetricsWriter(output_dir, self.is_logger, train.tensorboard)
        self.telemetry = telemetry if telemetry is not None else Telemetry(device)
        self.heldout = heldout
        self.fault_injector = fault_injector
        self.log = get_logger()
        # (layer, expert) pairs seen without tokens, and those not yet in a log line (log_empty_experts).
        self._empty_experts_seen = set()
        self._empty_experts_unlogged = set()
        # Set by a SIGTERM handler; all-reduced each step so that every rank stops at the same step.
        self.stop_requested = False
        self.step_expert_load: dict = {}  # adapted layer -> slots per expert over the last step's global batch
        self.checkpoints = CheckpointManager(config, groups, self)  # saves and restores this trainer's state
        enter_training_mode(model)

    # ---- the loop --------------------------------------------------------------------------
    def fit(self, hooks=None) -> bool:
        """Train from the newest checkpoint (``checkpoint.resume``) or from step 0 to ``total_steps``;
        return whether the run got there — False when a stop was asked (SIGTERM's ``STOP_EVENT``:
        every rank saves the same step and leaves the loop). ``config.yaml`` and ``run_info.json``
        are written after the resume, so a refused one leaves the run's files as they were.
        ``hooks`` (tests, tools) may define ``on_start(trainer)``, called after the resume, and
        ``on_end(trainer)``, called after the last step."""
        self.checkpoints.resume_or_start()
        if self.is_logger:
            write_run_info(self.config, self.output_dir, self.groups)
        if hasattr(hooks, "on_start"):
            hooks.on_start(self)
        groups = self.groups
        self.log.info("training %s on %d process(es) (tp=%d, dp=%d, ep=%d) for %d steps from step %d",
                      self.config.adapter.method, dist.get_world_size(), groups.tp, groups.dp, groups.ep,
                      self.total_steps, self.step)
        progress = tqdm(total=self.total_steps, initial=self.step, disable=not self.is_logger, desc="train",
                        dynamic_ncols=True)
        with logging_redirect_tqdm(loggers=[self.log]):  # log lines go above the progress bar, not into it
            while self.step < self.total_steps:
                result = self.train_step()
                self._after_step(result, progress)
                if self.stop_requested:
                    self.log.warning("stop requested (SIGTERM): saved step %d on every rank, exiting", self.step)
                    STOP_EVENT.clear()
                    break
        progress.close()
        if hasattr(hooks, "on_end"):
            hooks.on_end(self)
        self.metrics.close()
        return self.step == self.total_steps

    def _after_step(self, result: StepResult, progress: tqdm) -> None:
        """The step's metrics row (written every ``train.log_interval`` steps and at the last), the
        progress bar, the held-out loss every ``train.eval_interval`` steps, and a checkpoint when
        one is due or a stop was asked."""
        train = self.config.train
        row = self.metrics_row(result)
        if self.step % train.log_interval == 0 or self.step == self.total_steps:
            self.metrics.write(row)
            self.log_empty_experts()
        progress.update(1)
        progress.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if train.eval_interval and self.step % train.eval_interval == 0:
            self.evaluate_and_record()
        if self.checkpoints.due() or self.stop_requested:
            self.checkpoints.save()

    def evaluate_and_record(self) -> None:
        """The held-out loss at this step (the whole model in eval mode meanwhile), its metrics row,
        and ``best.json`` when it is the lowest so far."""
        if self.heldout is None or self.heldout.sequences is None:
            return
        self.model.eval()
        loss = self.heldout.loss(self.model, self.groups, self.device, loss_token_mask)
        enter_training_mode(self.model)
        best = record_best(self.output_dir, self.step, loss) if self.is_logger else False
        self.metrics.write({"step": self.step, "eval_loss": loss, "best": best})

    # ---- one optimizer step --------------------------------------------------------------
    def _micro_batches(self, step: int) -> list:
        train = self.config.train
        return self.data.micro_batches(self.sampler, step, self.groups.dp_rank, self.groups.dp, train.micro_batch_size)

    def _dropout_context(self, index: int, shape: torch.Size) -> DropoutContext:
        """Adapter dropout draws from (seed, step, each token's place in the global batch), never
        from the rank: the same masks at every layout, and a resumed run continues exactly."""
        rows, seq_len = shape
        per_rank = self.config.train.global_batch_size // self.groups.dp
        first_row = self.groups.dp_rank * per_rank + index * self.config.train.micro_batch_size
        return DropoutContext(self.config.train.seed, self.step, token_places(first_row, rows, seq_len))

    def train_step(self) -> StepResult:
        """One optimizer step, as its phases: count the global batch's loss tokens, forward and
        backward each micro-batch, reduce, handle a non-finite step, update."""
        step_start = time.perf_counter()
        timer = PhaseTimer(self.device)
        batches = self._micro_batches(self.step)
        global_tokens = self._global_token_count(batches)
        sums = StepSums(self.model, len(self.data.task_names), self.device)
        for index, batch in enumerate(batches):
            self._forward_backward(index, batch, global_tokens, sums, timer)
        t2 = timer.mark()
        grad_norm, totals = self._reduce(sums)
        loss = totals.lm_sum / global_tokens
        t3 = timer.mark()
        timer.add("backward_s", t2, t3)  # the gradient reduction and clipping count as backward
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = self._skip_nonfinite(loss, totals.aux_sum, grad_norm)
        self._optimizer_step(skipped)
        timer.add("optimizer_s", t3, timer.mark())
        times = timer.totals()  # the step's one wait for the device's queue (CUDA)
        self.step += 1
        return StepResult(
            loss=loss, aux_loss=totals.aux_sum, grad_norm=float(grad_norm), skipped=skipped,
            tokens=int(totals.input_tokens), lr=lr,
            times={**times, "step_s": time.perf_counter() - step_start},
            task_loss=totals.task_loss(self.data.task_names),
        )

    def _global_token_count(self, batches: list) -> float:
        """The loss tokens of the whole global batch (at least 1): every micro-batch's loss is
        divided by it, so it is known before the first backward — one all-reduce over dp."""
        local_tokens = sum(int(loss_token_mask(b["labels"]).sum()) for b in batches)
        global_tokens = torch.tensor([float(local_tokens)], dtype=torch.float64, device=self.device)
        if self.groups.dp_group is not None:
            dist.all_reduce(global_tokens, group=self.groups.dp_group)
        return max(global_tokens.item(), 1.0)

    def _forward_backward(self, index: int, batch: dict, global_tokens: float, sums: StepSums,
                          timer: PhaseTimer) -> None:
        """Forward and backward of the step's ``index``-th micro-batch on this rank. Its loss is its
        summed token loss over the step's global token count, its router loss its share of the
        step's mean over all micro-batches, so the gradients summed over micro-batches and ranks are
        the single-process ones. Its statistics go to ``sums``, reduced once per step."""
        model, device = self.model, self.device
        micro_batches_per_step = self.config.train.global_batch_size // self.config.train.micro_batch_size
        batch = {k: v.to(device) for k, v in batch.items()}
        set_dropout_context(model, self._dropout_context(index, batch["input_ids"].shape))
        t0 = timer.mark()
        logits = model(batch["input_ids"], batch["position_ids"])
        token_losses = model.token_losses(logits, batch["labels"])
        loss = token_losses.sum() / global_tokens
        if self.fault_injector is not None:
            loss = self.fault_injector(self.step, loss)
        aux = auxiliary_loss(model).to(device) / micro_batches_per_step
        sums.load.add()
        t1 = timer.mark()
        (loss + aux).backward()
        timer.add("forward_s", t0, t1)
        timer.add("backward_s", t1, timer.mark())
        sums.add(batch, token_losses, loss, aux, global_tokens)

    def _reduce(self, sums: StepSums) -> tuple[torch.Tensor, StepTotals]:
        """The step's collectives after the last backward: gradients summed over their replicas and
        clipped to the global norm (which the non-finite check needs), then this rank's statistics
        and its stop flag packed into one all-reduce over dp — the flag also over tp, so that a stop
        asked on any rank stops every rank at the same step. Returns the norm before clipping and
        the global batch's statistics; sets ``stop_requested`` and ``step_expert_load``."""
        groups = self.groups
        reduce_gradients(self.params, groups)
        grad_norm = clip_grad_norm_(self.params, self.config.train.grad_clip, groups)
        stats = sums.packed(self.stop_requested or STOP_EVENT.is_set())
        if groups.dp_group is not None:
            dist.all_reduce(stats, group=groups.dp_group)
        if groups.tp_group is not None:  # a stop request on any rank reaches its tp peers too
            flag = stats[-1:].clone()
            dist.all_reduce(flag, group=groups.tp_group)
            stats[-1] = flag[0]
        totals = sums.unpacked(stats)
        self.step_expert_load = totals.expert_load
        self.stop_requested = totals.stop
        return grad_norm, totals

    def _skip_nonfinite(self, loss: float, aux_loss: float, grad_norm: torch.Tensor) -> bool:
        """Whether this step's update is skipped: a non-finite loss, router loss or gradient norm
        aborts the run (``train.nonfinite: abort``) or skips the update (``skip``, at most
        ``train.max_consecutive_skips`` in a row). They are the same on every rank after the
        reductions, so every rank takes the same decision without another collective."""
        if math.isfinite(loss) and math.isfinite(aux_loss) and bool(torch.isfinite(grad_norm)):
            self.consecutive_skips = 0
            return False
        message = (f"non-finite loss or gradient at step {self.step + 1} (loss={loss}, grad_norm={float(grad_norm)}); "
                   f"train.nonfinite={self.config.train.nonfinite}")
        if self.config.train.nonfinite == "abort":
            raise NonFiniteError(message + ": stopping before the optimizer step")
        self.skipped_steps += 1
        self.consecutive_skips += 1
        self.log.warning(message + ": step skipped")
        if self.consecutive_skips > self.config.train.max_consecutive_skips:
            raise NonFiniteError(f"{self.consecutive_skips} consecutive non-finite steps (limit "
                                 f"train.max_consecutive_skips={self.config.train.max_consecutive_skips})")
        return True

    def _optimizer_step(self, skipped: bool) -> None:
        """AdamW on the clipped gradients unless the step is skipped, then the scheduler — on a
        skipped step too: the learning rate follows the step count, as a resumed run sets it from
        the step — and the gradients freed for the next step's accumulation."""
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- metrics ---------------------------------------------------------------------------
    def _expert_load(self) -> tuple[dict, int]:
        """Per-layer expert load of the last step (slots per expert over its global batch), and how
        many (layer, expert) pairs got no tokens."""
        load, empty = {}, 0
        for name, counts in self.step_expert_load.items():
            load[name] = counts
            for expert, c in enumerate(counts):
                if c == 0:
                    empty += 1
                    if (name, expert) not in self._empty_experts_seen:
                        self._empty_experts_seen.add((name, expert))
                        self._empty_experts_unlogged.add((name, expert))
        return load, empty

    def log_empty_experts(self) -> None:
        """One line for the experts that got no tokens for the first time since the last call (a
        few idle experts in early steps are normal; many, or the same ones for long, are not)."""
        unlogged, self._empty_experts_unlogged = self._empty_experts_unlogged, set()
        if not unlogged or not self.is_logger:
            return
        self.log.warning("%d expert(s) in %d adapted layer(s) received no tokens for the first time by step %d "
                         "(per-step counts: empty_experts and expert_load in metrics.jsonl)",
                         len(unlogged), len({name for name, _ in unlogged}), self.step)

    def _traffic(self) -> dict:
        rows = counts = dropped = collectives = host_reads = 0
        for _, layer in adapter_layers(self.model):
            t = layer.traffic
            rows += t.dispatch_bytes + t.combine_bytes
            counts += t.count_exchange_bytes
            dropped += t.dropped_slots
            collectives += t.collectives
            host_reads += t.host_reads
            t.reset()
        # Backward mirrors each row exchange with one of the same size; the count exchange has none.
        return {"a2a_bytes": 2 * rows + counts, "dropped_slots": dropped, "a2a_collectives": collectives,
                "a2a_host_reads": host_reads}

    def metrics_row(self, result: StepResult) -> dict:
        """Call after every step (it resets the per-step traffic counters); write it when logging."""
        row = {
            "step": self.step,
            "loss": result.loss,
            "aux_loss": result.aux_loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": result.tokens / result.times["step_s"],
            **{f"time_{k}": v for k, v in result.times.items()},
            "skipped_steps": self.skipped_steps,
            "task_loss": result.task_loss,
            **self._traffic(),
            **self.telemetry.read(),
        }
        row["expert_load"], row["empty_experts"] = self._expert_load()
        return row
