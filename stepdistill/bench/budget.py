"""The same wall-time budget for every algorithm, without touching the trainer.

A short probe builds the run exactly as ``stepdistill train`` does (same config, teacher, batches,
optimizers, accelerator), runs a few warm-up iterations through ``Trainer.train_step`` in this process,
then times a few more; the run then trains ``floor(budget_s / s_per_it)`` iterations. Schedules that
the configs tie to ``trainer.max_steps`` are scaled by the same factor (:func:`fit_to_budget`), so a
shorter or longer run keeps the shape of the configured one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from stepdistill.errors import StepdistillError
from stepdistill.training.callbacks import LoggerConfig
from stepdistill.workflows.train import build_trainer

#: warm-up and timed iterations of the probe; multiples of 6 so the 1:1 (SiD) and 2:1 (DMD2,
#: f-distill) critic / generator cycles are timed whole
PROBE_WARMUP = 6
PROBE_ITERATIONS = 18


@dataclass
class Probe:
    """What the probe measured: ``s_per_it`` seconds per training iteration (one ``train_step``),
    the mean over ``iterations`` timed iterations after ``warmup`` untimed ones; ``setup_s``: building
    the run (and, for AGD, collecting the teacher's trajectories: data, not training)."""

    s_per_it: float
    iterations: int
    warmup: int
    setup_s: float


def probe(cfg: DictConfig, warmup: int = PROBE_WARMUP, iterations: int = PROBE_ITERATIONS) -> Probe:
    """Seconds per iteration of the run ``cfg`` (a composed train config), measured in this process.

    Nothing is written into ``cfg.output_dir`` except, for AGD, the teacher's trajectories (which the
    run then reuses).
    """
    if iterations < 1 or warmup < 0:
        raise StepdistillError(f"the probe needs iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
    start = time.perf_counter()
    trainer = build_trainer(cfg, _path(cfg.output_dir), logger=LoggerConfig())
    trainer.algorithm.train()
    setup = time.perf_counter() - start
    for step in range(warmup):
        trainer.train_step(step)
    start = time.perf_counter()
    for step in range(warmup, warmup + iterations):
        trainer.train_step(step)
    s_per_it = (time.perf_counter() - start) / iterations
    return Probe(s_per_it, iterations, warmup, round(setup, 2))


def budget_steps(budget_s: float, s_per_it: float) -> int:
    """Iterations that fit ``budget_s`` seconds at ``s_per_it`` (at least one)."""
    if budget_s <= 0:
        raise StepdistillError(f"budget_s must be > 0, got {budget_s}")
    return max(1, math.floor(budget_s / s_per_it))


def fit_to_budget(cfg: DictConfig, max_steps: int) -> dict[str, object]:
    """Set ``trainer.max_steps = max_steps`` in ``cfg`` and scale what the configs tie to it by
    ``max_steps / configured max_steps``: TSCD's ``algorithm.stage_steps`` (each stage keeps its share
    of the run) and SiD's ``algorithm.gan_warmup_steps``. ``trainer.checkpoint_every`` and
    ``trainer.sample_every`` become 0 (one checkpoint and one sample grid, at the end): every
    algorithm pays the same fixed overhead inside its wall time. The LR warmup (``optim.*warmup_steps``,
    a fixed number of updates) is left as configured.

    Returns:
        what changed: ``{key: (configured, budgeted)}``.
    """
    configured = int(cfg.trainer.max_steps)
    factor = max_steps / configured
    changed: dict[str, object] = {"trainer.max_steps": (configured, max_steps)}
    cfg.trainer.max_steps = max_steps
    algorithm = cfg.algorithm
    stages = algorithm.get("stage_steps")
    if stages:
        scaled = scale_stages([int(s) for s in stages], configured, max_steps)
        changed["algorithm.stage_steps"] = (list(stages), scaled)
        algorithm.stage_steps = scaled
    if algorithm.get("gan_warmup_steps"):
        value = int(algorithm.gan_warmup_steps)
        algorithm.gan_warmup_steps = round(value * factor)
        changed["algorithm.gan_warmup_steps"] = (value, algorithm.gan_warmup_steps)
    for key in ("checkpoint_every", "sample_every"):
        value = int(cfg.trainer.get(key) or 0)
        if value:  # 0 = only at the end: the same overhead for every algorithm, whatever its iteration count
            cfg.trainer[key] = 0
            changed[f"trainer.{key}"] = (value, 0)
    return changed


def scale_stages(stage_steps: list[int], configured: int, max_steps: int) -> list[int]:
    """Stage lengths (all but the last stage) for a run of ``max_steps`` instead of ``configured``
    iterations: each stage ends at the same fraction of the run (lengths may be 0 on tiny runs)."""
    ends, total = [], 0
    for s in stage_steps:
        total += s
        ends.append(min(max_steps, math.floor(total * max_steps / configured)))
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _path(value):
    if not value:
        raise StepdistillError("output_dir is required")
    return Path(str(value))
