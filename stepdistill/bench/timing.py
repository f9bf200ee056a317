"""Wall-clock timing of samplers for ``stepdistill bench speed``: warm-up, then best-of timings taken
in interleaved rounds so that a machine that slows down (shared CPUs, thermal throttling) slows every
measured sampler alike.

A *round* times every sampler in turn; a fast sampler is called several times per round (until it has
used ``min_time_s / rounds`` seconds), a slow one once. Each sampler's time is its best call over all
rounds (the least disturbed run of the same work), as ``timeit`` recommends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

#: at most this many calls of one sampler per round (a 1-step toy sampler takes microseconds)
MAX_CALLS_PER_ROUND = 50


@dataclass
class Timed:
    """One sampler to time: ``call()`` samples one batch; ``warmup()`` (default: ``call``) is run once
    before any timing (a cheaper call with the same shapes, e.g. the same model at one step)."""

    name: str
    call: Callable[[], object]
    warmup: Callable[[], object] | None = None
    times_s: list[float] = field(default_factory=list)
    round_best_s: list[float] = field(default_factory=list)

    @property
    def best_s(self) -> float:
        return min(self.times_s)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so a timing covers the work itself."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_calls(fn: Callable[[], object], device: torch.device | str, budget_s: float = 0.0,
                max_calls: int = MAX_CALLS_PER_ROUND) -> list[float]:
    """Seconds of each call of ``fn``: at least one call, more until ``budget_s`` is used (at most
    ``max_calls``)."""
    times: list[float] = []
    while not times or (sum(times) < budget_s and len(times) < max_calls):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


@torch.no_grad()
def time_interleaved(items: Sequence[Timed], device: torch.device | str, rounds: int = 3,
                     min_time_s: float = 1.0, progress: Callable[[str], None] | None = None) -> None:
    """Warm every item up, then run ``rounds`` rounds, each timing every item in order; fills each
    item's ``times_s`` (every call) and ``round_best_s`` (its best call per round)."""
    for item in items:
        (item.warmup or item.call)()
    synchronize(device)
    for r in range(rounds):
        for item in items:
            times = timed_calls(item.call, device, budget_s=min_time_s / rounds)
            item.times_s += times
            item.round_best_s.append(min(times))
        if progress is not None:
            progress(f"round {r + 1}/{rounds} done")
