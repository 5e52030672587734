"""Memory and utilisation readings for the metrics: NVML on GPUs, RSS on the CPU."""

from __future__ import annotations

import time

import psutil
import torch


def device_synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings of a phase are honest (benchmarks;
    the trainer times its phases with ``PhaseTimer`` instead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Seconds per phase of a training step without stalling the device between phases.

    On CUDA each boundary is a recorded event, read once at the end of the step (``totals``), so the
    host keeps queuing work while the device runs; a ``synchronize`` after every micro-batch's
    forward and backward would drain the queue each time. On the CPU the boundaries are
    ``perf_counter`` readings (the work is done when the call returns).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, phase: str, start, end) -> None:
        self.spans.append((phase, start, end))

    def totals(self) -> dict:
        """{phase: seconds}; on CUDA waits for the last event (the step's one wait for the device)."""
        out: dict = {}
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        for phase, start, end in self.spans:
            seconds = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            out[phase] = out.get(phase, 0.0) + seconds
        self.spans.clear()
        return out


class Telemetry:
    def __init__(self, device: torch.device):
        self.device = device
        self._nvml_handle = None
        if device.type == "cuda":
            import pynvml  # nvidia-ml-py

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> dict:

        out = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
        if self._nvml_handle is not None:
            import pynvml

            memory = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
            out.update(
                gpu_memory_used_mb=memory.used / 2**20,
                gpu_utilization_pct=pynvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu,
                torch_max_allocated_mb=torch.cuda.max_memory_allocated(self.device) / 2**20,
            )
        return out
