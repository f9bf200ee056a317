"""Classifier-free guidance ``u + s (c - u)`` (s = 1 means no guidance), and random-scale CFG.

A guidance scale is a number or a range ``[lo, hi]``: with a range every sample draws its own scale
uniformly from it at every teacher call (SNOOPI's PG-SB, Nguyen et al. 2024: random-scale CFG in the
teacher of a distribution-matching loss keeps training stable across backbones).

CFG is an affine combination with weights summing to one, and every parameterization is an
affine function of x0 at fixed (x_t, t), so guiding in x0 space equals guiding in eps, v or flow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.schedules import Prediction

Scale = float | tuple[float, float]


def parse_scale(value, name: str = "guidance_scale") -> Scale:
    """A CFG scale from a config: a number, or a range ``[lo, hi]`` (lo <= hi) for random-scale CFG."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a range [lo, hi], got {value!r}") from None
    if lo > hi:
        raise ValueError(f"{name}=[{lo}, {hi}] must have lo <= hi")
    return (lo, hi) if lo < hi else lo


def draw_scale(scale: Scale | Tensor, n: int, device: torch.device | str | None = None) -> float | Tensor:
    """The scale of one call for ``n`` samples: a range gives per-sample draws [n] (global RNG)."""
    if isinstance(scale, tuple):
        lo, hi = scale
        return lo + (hi - lo) * torch.rand(n, device=device, dtype=torch.float64)
    return scale


def representative_scale(scale: Scale) -> float:
    """One number for reports and evaluations: the scale itself, or the middle of a range."""
    return (scale[0] + scale[1]) / 2 if isinstance(scale, tuple) else float(scale)


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
