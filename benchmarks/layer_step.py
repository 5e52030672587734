"""The single-layer step loop of ``layer_speed.py`` and ``crossover.py``: one training step of one
adapter layer timed phase by phase, the rounds around it, and the statistics over the rounds.

A step is the layer's forward, the backward of ``<out, grad>`` (the input requiring grad, so that
the input gradient is computed as inside a network), an optional gradient reduction and the
optimizer step, each phase closed by a device synchronization. Next to the wall times, the process
CPU time (all threads), which leaves out time spent waiting for a core or for another rank, so on a
shared machine it is the steadier measure of the work done.

Rounds: every variant takes one step per round, in turn, so that drift of the machine hits all of
them alike; the first ``warmup`` rounds are not kept.
"""

from __future__ import annotations

import operator
import statistics
import time

from malora_dist.train.telemetry import device_synchronize

PHASES = ("forward_s", "backward_s", "reduce_s", "optimizer_s")


def time_step(module, x, grad, optimizer=None, reduce=None) -> dict:
    """One training step of ``module`` on ``x``: seconds per phase (``PHASES``; ``reduce_s`` is 0
    without ``reduce``, ``optimizer_s`` 0 without ``optimizer``), the process CPU time of the forward
    and backward (``fwd_bwd_cpu_s``) and of the whole step (``cpu_s``)."""
    device = x.device
    x.grad = None
    device_synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    out = module(x)
    device_synchronize(device)
    t1 = time.perf_counter()
    out.backward(grad)
    device_synchronize(device)
    t2, c2 = time.perf_counter(), time.process_time()
    if reduce is not None:
        reduce()
        device_synchronize(device)
    t3 = time.perf_counter()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        device_synchronize(device)
    t4, c4 = time.perf_counter(), time.process_time()
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "reduce_s": t3 - t2, "optimizer_s": t4 - t3,
            "fwd_bwd_cpu_s": c2 - c0, "cpu_s": c4 - c0}


def run_rounds(steps: dict, warmup: int, repeats: int, rotate: bool = False) -> dict:
    """``warmup + repeats`` rounds of ``steps`` (name → a callable that takes one step and returns its
    sample), each name once per round in the order given (rotated by one more place each round when
    ``rotate``); name → the samples of the ``repeats`` timed rounds, in round order."""
    names = list(steps)
    samples = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        offset = round_index % len(names) if rotate else 0
        for name in names[offset:] + names[:offset]:
            sample = steps[name]()
            if round_index >= warmup:
                samples[name].append(sample)
    return samples


def fwd_bwd_s(sample: dict) -> float:
    """Forward + backward seconds of one step."""
    return sample["forward_s"] + sample["backward_s"]


def step_s(sample: dict) -> float:
    """Seconds of the whole step (every phase)."""
    return sum(sample[key] for key in PHASES)


def spread(values, scale: float = 1.0, count: bool = False) -> dict:
    """Median, min and max of ``values`` times ``scale`` (with the number of values when ``count``)."""
    scaled = [scale * v for v in values]
    out = {"median": statistics.median(scaled), "min": min(scaled), "max": max(scaled)}
    if count:
        out["n"] = len(scaled)
    return out


def paired(values, reference, combine=operator.truediv, count: bool = False) -> dict:
    """The spread of ``combine(value, reference)`` round by round (ratios by default): robust to slow
    drift of the machine, which hits both of a round alike."""
    return spread([combine(v, r) for v, r in zip(values, reference)], count=count)
