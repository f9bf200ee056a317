"""Tiny students for the pipeline / export tests: perturbed copies of tiny teachers, and fake runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import NUM_CLASSES, perturbed

from stepdistill.denoisers.diffusers import UNet2DDenoiser
from stepdistill.denoisers.loading import load_denoiser, save_denoiser
from stepdistill.roles import Generator
from stepdistill.schedules import NoiseSchedule
from stepdistill.teachers import build_digits_unet


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every pipelines test module runs single-threaded (see ``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def sd15_dir(tmp_path_factory) -> Path:
    from stepdistill.tiny_stacks import build_tiny_sd15

    return build_tiny_sd15(tmp_path_factory.mktemp("stacks") / "sd15")


@pytest.fixture(scope="session")
def text_student(sd15_dir) -> Generator:
    return perturbed(load_denoiser(sd15_dir))


@pytest.fixture(scope="session")
def class_student(tmp_path_factory) -> Generator:
    """A class-conditional UNet2DModel student with a linear-beta VP schedule, saved and loaded back."""
    torch.manual_seed(0)
    unet = build_digits_unet((8, 16), 1, num_classes=NUM_CLASSES, norm_groups=4)
    schedule = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    path = save_denoiser(UNet2DDenoiser(unet, schedule, schedule.prediction),
                         tmp_path_factory.mktemp("class") / "student")
    return perturbed(load_denoiser(path), seed=2, scale=0.05)
