"""What the trainer shows and writes while it runs: logs, a progress bar, sample grids.

Each callback has ``after_step(record, last)`` and ``close()``; only the main process writes.

- ``MetricsLog``: every ``log_every`` steps (and every skipped step) one line in
  ``output_dir/logs.jsonl`` and a point in the accelerate trackers (wandb / tensorboard).
- ``Progress``: a tqdm bar with the phase and loss (tqdm adds it/s and the ETA).
- ``SampleGrid``: every ``sample_every`` steps and at the end, ``samples/step-XXXXXX.png`` from the
  EMA generator (the online one when EMA is off), drawn with the task's ``save_samples_figure``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.tasks import Task

LOGGERS = ("none", "wandb", "tensorboard")


@dataclass
class StepRecord:
    """What one optimizer step did.

    Attributes:
        step: 0-based index of the step.
        phase: the phase it ran.
        loss: the loss averaged over micro-batches and processes (nan when not finite).
        lr: the phase's learning rate used for the step.
        grad_norm: the phase's gradient norm before clipping.
        skipped: True when the non-finite guard skipped the update.
        logs: the algorithm's logs (main process, mean over micro-batches), kept as tensors so the
            training step does not wait for the device; converted only when a step is logged.
    """

    step: int
    phase: str
    loss: float
    lr: float
    grad_norm: float
    skipped: bool = False
    logs: dict[str, Any] = field(default_factory=dict)

    def float_logs(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.logs.items()}

    def row(self) -> dict[str, Any]:
        return {"step": self.step, "phase": self.phase, "loss": _finite_or_none(self.loss), "lr": self.lr,
                "grad_norm": _finite_or_none(self.grad_norm), "skipped": self.skipped,
                **{k: _finite_or_none(v) for k, v in self.float_logs().items()}}


@dataclass
class LoggerConfig:
    """Where metrics go besides ``logs.jsonl``.

    Args:
        kind: none | wandb | tensorboard.
        project: the wandb project / tensorboard run name.
        name: the wandb run name (default: wandb's).
        mode: wandb's mode: offline (default: nothing leaves the machine), online, disabled.
        entity: the wandb entity (team or user).
    """

    kind: str = "none"
    project: str = "stepdistill"
    name: str | None = None
    mode: str = "offline"
    entity: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in LOGGERS:
            raise StepdistillError(f"unknown logger.kind {self.kind!r}; allowed: {', '.join(LOGGERS)}")

    @property
    def log_with(self) -> str | None:
        return None if self.kind == "none" else self.kind

    def init_kwargs(self, output_dir: Path) -> dict[str, dict[str, Any]]:
        if self.kind != "wandb":
            return {}
        kwargs = {"mode": self.mode, "dir": str(output_dir), "name": self.name, "entity": self.entity}
        return {"wandb": {k: v for k, v in kwargs.items() if v is not None}}


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """A nested config as ``{"a.b": value}`` with scalars only (tensorboard's hparams need that)."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


class MetricsLog:
    """``logs.jsonl`` lines and tracker points (main process), every ``log_every``-th step of each
    phase (so a phase that runs every 6th step is logged as densely as one that runs every step).
    On resume, lines of steps at or after the resumed step (left by the interrupted run) are
    dropped so the file has no duplicates."""

    def __init__(self, accelerator, path: Path, log_every: int, start_step: int) -> None:
        self.accelerator, self.log_every = accelerator, max(1, int(log_every))
        self.phase_steps: dict[str, int] = {}
        self.file = None
        if accelerator.is_main_process:
            kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                    if _step_of(line) < start_step]
            path.write_text("".join(line + "\n" for line in kept))
            self.file = path.open("a")

    def after_step(self, record: StepRecord, last: bool) -> None:
        count = self.phase_steps.get(record.phase, 0)
        self.phase_steps[record.phase] = count + 1
        if not (count % self.log_every == 0 or record.skipped or last):
            return
        if self.file is not None:
            self.file.write(json.dumps(record.row()) + "\n")
            self.file.flush()
        values = {"loss": record.loss, "lr": record.lr, "grad_norm": record.grad_norm, **record.float_logs()}
        self.accelerator.log({f"{record.phase}/{k}": v for k, v in values.items() if math.isfinite(v)},
                             step=record.step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Progress:
    """A tqdm bar over all steps (resumed runs start where they left off)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", disable=not enabled,
                        dynamic_ncols=True, unit="step")

    def after_step(self, record: StepRecord, last: bool) -> None:
        loss = "skipped" if record.skipped else f"{record.loss:.4g}"
        self.bar.set_postfix(phase=record.phase, loss=loss, refresh=False)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class SampleGrid:
    """Sample grids of the generator into ``samples/step-XXXXXX.png`` (written by the main process).

    Args:
        task: a task with ``sample_figures`` (``stepdistill.tasks.Task``).
        model: a context manager giving (the generator to sample from, its row label) for its block,
            e.g. the EMA generator (``Trainer.sampling``).
        directory: the ``samples/`` directory.
        every: draw every ``every`` steps (0: only at the end).
        num_samples: samples per grid.
        seed: the seed of the (fixed) noise and labels, so grids of a run are comparable.
        collective: every process samples (a sharded generator's forward needs them all); the main
            process alone saves.
    """

    def __init__(self, accelerator, task: Task, model: Callable[[], AbstractContextManager[tuple[nn.Module, str]]],
                 directory: Path, every: int, num_samples: int, seed: int, collective: bool = False) -> None:
        self.accelerator, self.task, self.model = accelerator, task, model
        self.directory, self.every = directory, int(every)
        self.num_samples, self.seed, self.collective = int(num_samples), int(seed), bool(collective)

    def after_step(self, record: StepRecord, last: bool) -> None:
        done = record.step + 1
        due = last or (self.every > 0 and done % self.every == 0)
        if due and (self.collective or self.accelerator.is_main_process):
            self.draw(done)

    @torch.no_grad()
    def draw(self, step: int) -> Path | None:
        """Sample (on every process when ``collective``); the main process saves the grid."""
        labels = self.task.eval_labels(self.num_samples)
        with self.model() as (generator, label):
            device = next(generator.parameters()).device
            g = torch.Generator().manual_seed(self.seed)
            noise = torch.randn((len(labels), *self.task.sample_shape), generator=g).to(device)
            cond = Conditioning.labels(labels, self.task.null_class).to(device)
            was_training = generator.training
            generator.eval()
            try:
                x = generator.sample(noise, cond, generator=g).float().cpu()
            finally:
                generator.train(was_training)
        if not self.accelerator.is_main_process:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{step:06d}.png"
        self.task.save_samples_figure({f"step {step}: {label}": x}, labels, path)
        return path

    def close(self) -> None:
        pass


def _step_of(line: str) -> float:
    """The step of a logs.jsonl line (infinity for a line cut short by a crash)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
