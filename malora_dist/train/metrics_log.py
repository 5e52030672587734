"""``<output_dir>/metrics.jsonl``: one JSON object per logged step, written by rank 0 only."""

from __future__ import annotations

import json
import os


class MetricsWriter:
    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = False):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop rows past ``step`` (a resumed run rewrites them) — atomically."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(rows)
        os.replace(tmp, self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])
                elif isinstance(value, dict) and key == "task_loss":
                    for name, v in value.items():
                        self._tb.add_scalar(f"task_loss/{name}", v, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str) -> list:
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

