"""Pure loss functions: tensors in, per-sample [B] losses out. No modules, no optimizers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Denoising regression loss ``mean_CHW (pred - target)^2`` per sample, in the network's own
    parameterization (DDPM, Ho et al. 2020, eq. 14 for eps; rectified flow, Liu et al. 2023, eq. 1
    for velocity).

    Args:
        pred: [B, ...] network output.
        target: [B, ...] ``NoiseSchedule.target`` for the same (x0, eps, t).
    Returns:
        [B] losses.
    """
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def distribution_matching_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor,
                               weight: Tensor | None = None) -> Tensor:
    """Distribution-matching surrogate whose gradient in ``x`` is the DMD gradient.

    DMD (Yin et al. 2024a, Eq. 7-8) / DMD2 (Yin et al. 2024b, Alg. 1): the KL gradient is
    ``(x0_fake - x0_real)`` (fake minus real score, in x0 form), normalised per sample by
    ``mean_CHW |x - x0_real|``; f-distill (Xu et al. 2025, Eq. 9) multiplies it by ``h(r)``
    (``weight``). The loss ``0.5 * mean_CHW (x - sg(x - grad))^2`` has d/dx = grad / CHW.

    Args:
        x: [B, ...] generator samples (with grad).
        x0_real: [B, ...] the teacher's (guided) x0 at the noised samples, no grad.
        x0_fake: [B, ...] the critic's x0 there, no grad.
        weight: optional [B] per-sample weight h(r).
    Returns:
        [B] losses.
    """
    with torch.no_grad():
        norm = (x.double() - x0_real.double()).abs().flatten(1).mean(1).clamp_min(1e-12)
        grad = (x0_fake.double() - x0_real.double()) / norm.reshape(-1, *([1] * (x.dim() - 1)))
        if weight is not None:
            grad = grad * weight.double().reshape(-1, *([1] * (x.dim() - 1)))
        target = (x.double() - torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)).float()
    return 0.5 * (x.float() - target).pow(2).flatten(1).mean(1)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))`` per sample (Goodfellow et al. 2014;
    DMD2 Sec. 4.3, Eq. 5)."""
    return F.softplus(-logits_fake.float())


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` per sample (DMD2 Eq. 6)."""
    return F.softplus(logits_fake.float()) + F.softplus(-logits_real.float())
