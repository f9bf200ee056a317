"""Shared pieces of the algorithm tests: a tiny class-conditional UNet teacher with its 4-step
generator and headed critic, a fixed labelled batch, and the "only the running phase trains" check."""

from __future__ import annotations

import torch

from stepdistill.algorithms.base import Batch
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.diffusers import UNet2DDenoiser
from stepdistill.roles import Critic, Generator, Teacher
from stepdistill.schedules import NoiseSchedule, Prediction
from stepdistill.teachers import build_digits_unet

NULL = 3  # the null class of the 3-class test UNet


def tiny_parts() -> tuple[Teacher, Generator, Critic]:
    """(teacher with CFG 2, 4-step generator, critic with a GAN head) on an 8x8 3-class UNet."""
    torch.manual_seed(0)
    unet = build_digits_unet((8, 16), 1, num_classes=3, norm_groups=4)
    teacher = Teacher(UNet2DDenoiser(unet, NoiseSchedule.vp("linear", 1000, 1e-4, 0.02), Prediction.EPS),
                      guidance_scale=2.0)
    return teacher, Generator(teacher.denoiser, steps=4), Critic(teacher.denoiser, head=True)


def labelled_batch(x0: bool = True) -> Batch:
    """Four labelled samples (real 8x8 images unless ``x0=False``), the same on every call."""
    g = torch.Generator().manual_seed(1)
    return Batch(Conditioning.labels(torch.tensor([0, 1, 2, 0]), NULL),
                 torch.randn(4, 1, 8, 8, generator=g) if x0 else None)


def train_only(algo, phase: str) -> None:
    """requires_grad as the trainer sets it for ``phase``."""
    for module in (algo.generator, algo.critic):
        module.requires_grad_(module in algo.trainable(phase))


def assert_only_the_phase_trains(parts, phase: str, out, generator_logs: set[str]) -> None:
    """After ``out.loss.backward()``: the phase's module got gradients, the other and the teacher none;
    the critic phase also trains the GAN head; the logs name the phase's terms."""
    teacher, generator, critic = parts
    trained, frozen = (critic, generator) if phase == "critic" else (generator, critic)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    assert all(p.grad is None for p in frozen.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    if phase == "critic":
        assert all(p.grad is not None for p in critic.head.parameters())
        assert {"critic_denoising_loss", "gan_critic_loss"} <= set(out.logs)
    else:
        assert generator_logs <= set(out.logs)
