"""Helpers shared by the pipeline tests (a plain module: ``conftest`` is not importable by name)."""

from __future__ import annotations

from pathlib import Path

import torch

from stepdistill.denoisers.loading import save_denoiser
from stepdistill.roles import Generator

NUM_CLASSES = 3
STEPS = 4


def perturbed(denoiser, steps: int = STEPS, seed: int = 1, scale: float = 0.02) -> Generator:
    """A Generator whose backbone differs from the teacher's by seeded noise on every weight."""
    generator = Generator(denoiser, steps=steps).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return generator


def make_run(root: Path, generator: Generator, teacher_path: Path | None, settings: dict | None = None,
             **extra) -> Path:
    """A run directory as the trainer writes it: config.yaml (resolved) + student/."""
    from omegaconf import OmegaConf

    root.mkdir(parents=True)
    config = {"teacher": {"path": str(teacher_path) if teacher_path else None},
              "generator": settings or {"_target_": "stepdistill.roles.Generator", "steps": generator.steps},
              "data": {"_target_": "stepdistill.data.digits.DigitsData"},
              "task": {"_target_": "stepdistill.eval.tasks.DigitsTask"}, **extra}
    OmegaConf.save(OmegaConf.create(config), root / "config.yaml")
    save_denoiser(generator.denoiser, root / "student")
    return root

