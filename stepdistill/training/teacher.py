"""Train a teacher denoiser from scratch on embedded data (toy2d, digits).

The loss is the plain denoising loss in the backbone's own parameterization, with condition
dropout so the teacher supports classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.ema import EMA
from stepdistill.losses import denoising_loss

#: (batch_size, generator) -> (x0 [B, ...], class labels [B])
BatchSampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]


@dataclass
class TeacherTraining:
    """Hyper-parameters of teacher training (defaults suit the 8x8 digits UNet)."""

    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 100
    class_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0


def denoiser_loss(denoiser: Denoiser, x0: Tensor, cond: Conditioning, generator: torch.Generator) -> Tensor:
    """Mean denoising loss of ``denoiser`` on a batch at random times."""
    schedule = denoiser.schedule
    t = schedule.sample_time(x0.shape[0], generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = schedule.add_noise(x0, eps, t)
    target = schedule.target(x0, eps, t, denoiser.prediction)
    return denoising_loss(denoiser.raw(x_t, t, cond), target).mean()


def train_teacher(denoiser: Denoiser, sample_batch: BatchSampler, null_class: int,
                  config: TeacherTraining, *, progress: bool = True,
                  on_step: Callable[[int, float], None] | None = None) -> Denoiser:
    """Train ``denoiser`` in place and return its EMA copy (the teacher to ship).

    Args:
        sample_batch: draws (x0, labels) batches.
        null_class: the class index used for condition dropout (CFG's unconditional branch).
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    denoiser.train().requires_grad_(True)
    ema = EMA(denoiser, config.ema_decay)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(config.warmup, config.steps))
    bar = _progress(config.steps, progress)
    for step in range(config.steps):
        x0, labels = sample_batch(config.batch_size, generator)
        drop = torch.rand(labels.shape[0], generator=generator) < config.class_dropout
        cond = Conditioning.labels(labels, null_class).drop(drop)
        loss = denoiser_loss(denoiser, x0, cond, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        ema.update(denoiser)
        if on_step is not None:
            on_step(step, float(loss.detach()))
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
        bar.update()
    bar.close()
    return ema.model


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="teacher", disable=not enabled, dynamic_ncols=True)
