"""Builders of the embedded teachers' backbones and schedulers (digits UNet, toy2d MLP).

Config nodes point here with ``_target_``; ``stepdistill teacher train`` trains what they build.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel


def build_digits_unet(channels: Sequence[int] = (32, 64), layers_per_block: int = 2,
                      num_classes: int = 10, norm_groups: int = 8) -> UNet2DModel:
    """A class-conditional pixel-space UNet2DModel for 8x8 digits, no attention (cheap on CPU).

    ``num_classes + 1`` class embeddings: the last index is the null class for CFG.
    """
    n = len(channels)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block, down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n, num_class_embeds=num_classes + 1,
        norm_num_groups=norm_groups, add_attention=False)


def build_ddpm_scheduler(beta_schedule: str = "linear", beta_start: float = 1e-4,
                         beta_end: float = 0.02, prediction_type: str = "epsilon") -> DDPMScheduler:
    """DDPM's 1000-step schedule (Ho et al. 2020), eps prediction by default."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
                         beta_end=beta_end, prediction_type=prediction_type, clip_sample=False)


def build_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow scheduler (velocity prediction) with an optional time shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
