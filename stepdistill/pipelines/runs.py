"""A training run's student: ``load_run`` (a run directory -> ``StudentRun``) and ``build_generator``
(a run's ``generator`` config node around a loaded denoiser), for sampling, evaluation and export."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import OmegaConf

from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.roles import Generator


@dataclass
class StudentRun:
    """A training run directory: ``config.yaml`` (resolved) and ``student/`` (``save_denoiser``)."""

    path: Path
    config: Any
    generator: Generator

    @property
    def teacher_path(self) -> Path | None:
        teacher = self.config.get("teacher") if self.config is not None else None
        path = teacher.get("path") if teacher is not None else None
        return Path(str(path)) if path else None


def load_run(run_dir: str | Path) -> StudentRun:
    """Load a run's student as a ``Generator`` (steps and t_max from the run's ``generator`` config)."""
    if not run_dir:
        raise StepdistillError("run=DIR is required: the training run directory")
    root = Path(str(run_dir)).expanduser()
    if not root.is_dir():
        raise StepdistillError(f"run directory not found: {str(root)!r}")
    if not (root / "student").is_dir():
        raise StepdistillError(f"run {str(root)!r} has no student/ directory (is training finished? "
                               "the trainer writes student/ at the end)")
    config = OmegaConf.load(root / "config.yaml") if (root / "config.yaml").is_file() else OmegaConf.create({})
    generator = build_generator(config.get("generator"), load_denoiser(root / "student"),
                                adapters_dir=root / "student" / "adapters").eval()
    return StudentRun(root, config, generator)


def build_generator(gen_cfg: Any, denoiser: Any, adapters_dir: Path | None = None) -> Generator:
    """The run's ``generator`` node (its ``_target_`` class and settings) around a loaded student
    ``denoiser`` (not copied); a plain ``Generator`` for configs without a target. An AGD student
    (``AdapterGenerator``) loads its trained adapters from ``adapters_dir``."""
    settings = dict(gen_cfg) if isinstance(gen_cfg, dict) else \
        OmegaConf.to_container(gen_cfg, resolve=True) if gen_cfg is not None else {}
    for key in ("lora_rank", "lora_alpha", "lora_target_modules"):  # a saved LoRA student is merged
        settings.pop(key, None)
    cls = get_class(settings.pop("_target_", "stepdistill.roles.Generator"))
    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        raise StepdistillError(f"generator._target_ {cls!r} is not a stepdistill.roles.Generator")
    if "adapters_path" in inspect.signature(cls).parameters:
        if adapters_dir is None or not Path(adapters_dir).is_dir():
            raise StepdistillError(f"{cls.__name__} needs its trained adapters: no directory {str(adapters_dir)!r}")
        settings["adapters_path"] = str(adapters_dir)
    return cls(denoiser, **settings, copy=False)
