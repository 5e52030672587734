"""A described machine: what the step-time model prices the counted work with.

Presets come from the vendors' published figures (NVIDIA H100 and H200 SXM datasheets: dense BF16
tensor-core peak 989 TFLOP/s, HBM3 3.35 TB/s / HBM3e 4.8 TB/s, 80 / 141 GB, NVLink 4 at 900 GB/s
per GPU in both directions together, so 450 GB/s each way; NVIDIA ConnectX-7 InfiniBand NDR at
400 Gb/s = 50 GB/s per GPU, one adapter per GPU as in a DGX/HGX H100 node). Latencies are not
datasheet figures: ``LATENCY_NOTE`` says what they are. A machine of one's own is a YAML or JSON
file with the same keys (``load_machine``).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields

import yaml

LATENCY_NOTE = ("link latencies are assumptions, not datasheet figures: the order of a small NCCL "
                "collective within an NVLink node (10 µs) and across InfiniBand (20 µs)")


@dataclass(frozen=True)
class Machine:
    name: str
    peak_flops: float  # matmul FLOP/s at the activations' dtype
    memory_bytes_per_s: float  # device memory bandwidth (read + write)
    memory_bytes: float  # device memory per rank
    gpus_per_node: int
    intra_latency_s: float
    intra_bytes_per_s: float  # per rank, one direction
    inter_latency_s: float
    inter_bytes_per_s: float  # per rank, one direction
    op_s: float = 0.0  # fixed cost of one op (launch, dispatch); 0 where ops queue asynchronously
    source: str = ""

    def link(self, span_ranks: int) -> tuple[float, float]:
        """(latency, bytes/s) of a group whose ranks lie within ``span_ranks`` consecutive ranks."""
        if span_ranks <= self.gpus_per_node:
            return self.intra_latency_s, self.intra_bytes_per_s
        return self.inter_latency_s, self.inter_bytes_per_s

    def to_dict(self) -> dict:
        return asdict(self)


_NVLINK4 = dict(gpus_per_node=8, intra_latency_s=10e-6, intra_bytes_per_s=450e9, inter_latency_s=20e-6,
                inter_bytes_per_s=50e9)
PRESETS = {
    "h100": Machine("H100 SXM, NVLink 4, InfiniBand NDR", peak_flops=989e12, memory_bytes_per_s=3.35e12,
                    memory_bytes=80e9, **_NVLINK4,
                    source="NVIDIA H100 SXM datasheet; ConnectX-7 NDR 400 Gb/s; " + LATENCY_NOTE),
    "h200": Machine("H200 SXM, NVLink 4, InfiniBand NDR", peak_flops=989e12, memory_bytes_per_s=4.8e12,
                    memory_bytes=141e9, **_NVLINK4,
                    source="NVIDIA H200 SXM datasheet; ConnectX-7 NDR 400 Gb/s; " + LATENCY_NOTE),
}


def load_machine(name_or_path: str) -> Machine:
    """A preset name (``h100``, ``h200``) or a YAML/JSON file with ``Machine``'s keys."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if not os.path.isfile(name_or_path):
        raise ValueError(f"--machine {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    with open(name_or_path) as f:
        raw = json.load(f) if name_or_path.endswith(".json") else yaml.safe_load(f)
    known = {f.name for f in fields(Machine)}
    if not isinstance(raw, dict):
        raise ValueError(f"{name_or_path}: a machine file is a mapping of {sorted(known)}")
    unknown = set(raw) - known
    missing = {f.name for f in fields(Machine) if f.default is MISSING and f.name not in raw}
    if unknown:
        raise ValueError(f"{name_or_path}: unknown machine keys {sorted(unknown)}; known: {sorted(known)}")
    if missing:
        raise ValueError(f"{name_or_path}: missing machine keys {sorted(missing)}")
    for key in known - {"name", "source", "gpus_per_node"}:
        if key in raw and not (isinstance(raw[key], (int, float)) and raw[key] >= 0):
            raise ValueError(f"{name_or_path}: {key} must be a non-negative number, got {raw[key]!r}")
    return Machine(**raw)
