"""A task's ``sample: N``: a seeded random sample of its training records that does not depend on
the order of the files (or of the hub's shards).

Each record gets a key, the hash of (seed, its canonical JSON); the N records with the smallest
keys form the sample, in key order. A copy of the dataset shuffled or split differently gives the
same sample; another seed gives an independent one.
"""

from __future__ import annotations

import hashlib
import json
import logging

log = logging.getLogger(__name__)


def record_key(data: dict, seed: int) -> bytes:
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(f"{seed}\0{canonical}".encode()).digest()


def sample_records(records: list, count: int, seed: int, task_name: str) -> list:
    """``count`` of ``records`` chosen by ``seed``; all of them (with a warning) if there are fewer."""
    if len(records) < count:
        log.warning("task %s: sample %d asks for more records than the %d it has; training on all of them",
                    task_name, count, len(records))
    keyed = sorted(records, key=lambda r: record_key(r.data, seed))
    return keyed[:count]
