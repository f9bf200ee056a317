"""Pure loss functions: tensors in, per-sample [B] losses out. No modules, no optimizers."""

from __future__ import annotations

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
