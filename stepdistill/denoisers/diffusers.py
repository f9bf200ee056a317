"""Adapters that put diffusers backbones behind ``Denoiser``.

Only this module converts continuous ``t`` to a backbone's own timestep (via the schedule).
"""

from __future__ import annotations

from torch import Tensor

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser


class UNet2DDenoiser(Denoiser):
    """``diffusers.UNet2DModel``, unconditional or class-conditional (``class_labels``)."""

    default_feature_modules = ("mid_block",)

    def raw(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.backbone(x_t, self.model_time(t, x_t), class_labels=cond.class_labels).sample
