"""Memory and utilisation readings for the metrics: NVML on GPUs, RSS on the CPU."""

from __future__ import annotations

import torch


def device_synchronize(device: torch.device) -> None:
    """Wait for queued device work, so that wall-clock timings of a phase are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        import psutil

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
