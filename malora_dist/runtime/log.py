"""One logger for the package; rank 0 prints by default, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def setup_logging(rank: int, all_ranks: bool = False) -> logging.Logger:
    global _CONFIGURED
    logger = logging.getLogger("malora_dist")
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        _CONFIGURED = True
    verbose = all_ranks or rank == 0 or os.environ.get("MALORA_LOG_ALL_RANKS") == "1"
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger("malora_dist")
