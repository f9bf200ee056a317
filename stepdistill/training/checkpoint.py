"""Atomic, resumable checkpoints: ``output_dir/checkpoints/checkpoint-<step>/``.

A checkpoint is ``accelerator.save_state`` (prepared models, optimizers, LR schedules, every
process's RNG states) plus the trainer's own files: the EMA weights (``ema.safetensors``) and
``trainer_state.json`` (step, non-finite counters, loss history). It is written into a hidden temporary directory beside the
others and renamed into place only when complete, so a crash during a save leaves the previous
checkpoints intact and never a half-written ``checkpoint-<step>``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

from stepdistill.denoisers.loading import save_denoiser
from stepdistill.ema import EMA
from stepdistill.errors import StepdistillError

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
OLD_PREFIX = ".old-checkpoint-"
SHARDED = "sharded"  # a sharded run's roles, optimizers and EMA (torch distributed checkpoint)
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """The trainer's own resumable state (``trainer_state.json`` in every checkpoint).

    Attributes:
        step: optimizer steps done.
        skipped_nonfinite: steps skipped by the non-finite guard, in all.
        nonfinite_in_a_row: the current run of skipped steps.
        history: ``{"step", "phase", "loss"}`` of every step done.
    """

    step: int = 0
    skipped_nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: null (none), ``auto`` (the latest in this run, if
    any), a checkpoint directory, or a run directory (its latest checkpoint)."""
    if resume in (None, "", False, "none", "null"):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(output_dir / "checkpoints")
    path = Path(str(resume)).expanduser()
    if _NAME.match(path.name) and path.is_dir():
        return path
    latest = latest_checkpoint(path / "checkpoints") if path.is_dir() else None
    if latest is None:
        raise StepdistillError(f"trainer.resume={resume!r}: no checkpoint there; pass auto, a "
                               "checkpoints/checkpoint-<step> directory or a run directory with checkpoints/")
    return latest


def remove_partial(root: Path) -> None:
    """Delete temporary directories left by a save that crashed (and put back a checkpoint that a
    crash caught in the middle of being replaced)."""
    if not root.is_dir():
        return
    for p in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f"{OLD_PREFIX}*"):
        final = root / (PREFIX + p.name[len(OLD_PREFIX):])
        if final.exists():
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.replace(p, final)


def save_checkpoint(accelerator, root: Path, state: TrainerState, ema: EMA | None,
                    keep_last: int | None, extra: Callable[[Path], None] | None = None) -> Path:
    """Save the full training state at ``state.step`` atomically; keep the newest ``keep_last``.

    Every process takes part (each saves its RNG state, and ``extra(directory)`` runs on every
    process: a sharded run's shards); only the main process writes the EMA and trainer state, renames
    and prunes.
    """
    final = root / f"{PREFIX}{state.step}"
    tmp = root / f"{TMP_PREFIX}{state.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if extra is not None:
            extra(tmp)
        if accelerator.is_main_process:
            _write_trainer_files(tmp, state, ema)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _commit(tmp, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def _write_trainer_files(directory: Path, state: TrainerState, ema: EMA | None) -> None:
    if ema is not None:
        save_model(ema.model, str(directory / "ema.safetensors"))
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state)))


def load_checkpoint(accelerator, path: Path, ema: EMA | None,
                    extra: Callable[[Path], None] | None = None) -> TrainerState:
    """Restore what ``save_checkpoint`` saved (models, optimizers, schedules, RNG states, EMA;
    ``extra(path)`` on every process: a sharded run's shards)."""
    if (extra is None) == (path / SHARDED).is_dir():
        wrote = "fsdp (or hsdp)" if (path / SHARDED).is_dir() else "ddp"
        raise StepdistillError(f"cannot resume from {str(path)!r}: a sharded checkpoint (trainer.strategy=fsdp|hsdp) "
                               f"resumes only with a sharded strategy, a ddp one only with ddp: set "
                               f"trainer.strategy={wrote}, the strategy that wrote it")
    try:
        accelerator.load_state(str(path))
        if extra is not None:
            extra(path)
        state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
        if ema is not None:  # the parameters' device: "cpu", never accelerate's "cpu:0"
            load_model(ema.model, str(path / "ema.safetensors"), device=str(next(ema.model.parameters()).device))
    except Exception as e:  # torch, safetensors and json errors alike: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StepdistillError(f"cannot resume from {str(path)!r} (another experiment's or an "
                               f"incomplete checkpoint?): {first}") from None
    return state


def export_student(generator: nn.Module, directory: Path) -> Path:
    """Write ``generator.denoiser`` as a diffusers-format directory, replacing ``directory`` whole;
    an AGD student's guidance adapters go to ``adapters/`` inside it."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_denoiser(generator.denoiser, tmp)
    if getattr(generator, "adapters", None) is not None:
        generator.adapters.save(tmp / "adapters")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _commit(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` (replacing an older save of the same step)."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(OLD_PREFIX + final.name[len(PREFIX):])
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep_last: int | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (None or 0 keeps all)."""
    if not keep_last or keep_last <= 0:
        return
    for _step, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
