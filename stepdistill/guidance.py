"""Classifier-free guidance ``u + s (c - u)`` (s = 1 means no guidance).

CFG is an affine combination with weights summing to one, and every parameterization is an
affine function of x0 at fixed (x_t, t), so guiding in x0 space equals guiding in eps, v or flow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.schedules import Prediction


def cfg(uncond: Tensor, cond: Tensor, scale: float | Tensor) -> Tensor:
    """``uncond + scale * (cond - uncond)``; ``scale`` is a float or a per-sample [B] tensor."""
    if isinstance(scale, Tensor) and scale.dim() > 0:
        scale = scale.to(cond).reshape(-1, *([1] * (cond.dim() - 1)))
    return uncond + scale * (cond - uncond)


def guided_predict(denoiser: Denoiser, x_t: Tensor, t: Tensor | float, cond: Conditioning,
                   scale: float | Tensor = 1.0, *, out: Prediction = Prediction.X0) -> Tensor:
    """One batched forward over [cond; null] and CFG at ``scale``; a plain forward when scale == 1."""
    if not isinstance(scale, Tensor) and float(scale) == 1.0:
        return denoiser(x_t, t, cond, out=out)
    b = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
    t = t.expand(b) if t.dim() == 0 else t
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, cond.null()]), out=out)
    return cfg(both[b:], both[:b], scale)
