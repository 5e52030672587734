"""Run a function in a real multi-process world on gloo (127.0.0.1) and collect what each rank returns.

Tests start one world per world size and run many cases inside it: spawning is the slow part on
2 cores, so a module-scoped fixture calls ``run_world`` once and the test functions check its results.
"""

from malora_dist.runtime.local_world import run_local_world


def run_world(world_size: int, fn, *args):
    """Call ``fn(*args)`` on every rank of a fresh gloo world (one thread per rank)."""
    return run_local_world(world_size, fn, *args)
