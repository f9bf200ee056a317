"""Adapters that put diffusers backbones behind ``Denoiser``.

Only this module converts continuous ``t`` to a backbone's own timestep (via the schedule).
"""

from __future__ import annotations

from torch import Tensor, nn

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.schedules import NoiseSchedule, Prediction


class _UNetShapes:
    """Sample and mid-block feature shapes of a diffusers UNet, from its config."""

    backbone: nn.Module

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return _unet_sample_shape(self.backbone.config)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return _unet_mid_shape(self.backbone.config)


class UNet2DDenoiser(_UNetShapes, Denoiser):
    """``diffusers.UNet2DModel``, unconditional or class-conditional (``class_labels``)."""

    default_feature_modules = ("mid_block",)

    def raw(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.backbone(x_t, self.model_time(t, x_t), class_labels=cond.class_labels).sample


class UNet2DConditionDenoiser(_UNetShapes, Denoiser):
    """``diffusers.UNet2DConditionModel`` conditioned on prompt embeddings (SD1.5, SD2, SDXL).

    SD1.5-style: ``cond.prompt_embeds`` [B, L, D] is the cross-attention context. SDXL-style (the
    unet's ``addition_embed_type == "text_time"``): also ``cond.pooled_embeds`` [B, P] and
    ``cond.time_ids`` [B, 6] as ``added_cond_kwargs``. Inputs and outputs are latents [B, C, H, W].
    """

    default_feature_modules = ("mid_block",)

    @property
    def uses_text_time(self) -> bool:
        return self.backbone.config.get("addition_embed_type") == "text_time"

    def raw(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.prompt_embeds is None:
            raise ValueError("UNet2DConditionDenoiser needs cond.prompt_embeds [B, L, D]")
        added = None
        if self.uses_text_time:
            if cond.pooled_embeds is None or cond.time_ids is None:
                raise ValueError("an SDXL-style unet needs cond.pooled_embeds [B, P] and cond.time_ids [B, 6]")
            added = {"text_embeds": cond.pooled_embeds.to(x_t.dtype), "time_ids": cond.time_ids.to(x_t.dtype)}
        return self.backbone(x_t, self.model_time(t, x_t), encoder_hidden_states=cond.prompt_embeds.to(x_t.dtype),
                             added_cond_kwargs=added).sample


class SD3Denoiser(Denoiser):
    """``diffusers.SD3Transformer2DModel`` (rectified flow; the backbone predicts the velocity).

    Conditioning: ``cond.prompt_embeds`` [B, L, D_joint] (CLIP + T5 tokens) and ``cond.pooled_embeds``
    [B, P]; the timestep is ``t * N`` (``N = 1000``), as the scheduler's sigmas * 1000. Latents
    [B, C, H, W]. ``features`` defaults to the image tokens [B, H*W/p^2, D] entering the middle block
    (its timestep-modulated norm: a joint block itself returns the text stream first).
    """

    def __init__(self, backbone: nn.Module, schedule: NoiseSchedule,
                 prediction: Prediction = Prediction.FLOW) -> None:
        super().__init__(backbone, schedule, prediction)
        self.default_feature_modules = (f"transformer_blocks.{len(backbone.transformer_blocks) // 2}.norm1",)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return _unet_sample_shape(self.backbone.config)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        c = self.backbone.config
        tokens = (c.sample_size // c.patch_size) ** 2
        return (tokens, c.num_attention_heads * c.attention_head_dim)

    def raw(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.prompt_embeds is None or cond.pooled_embeds is None:
            raise ValueError("SD3Denoiser needs cond.prompt_embeds [B, L, D] and cond.pooled_embeds [B, P]")
        return self.backbone(hidden_states=x_t, timestep=self.model_time(t, x_t),
                             encoder_hidden_states=cond.prompt_embeds.to(x_t.dtype),
                             pooled_projections=cond.pooled_embeds.to(x_t.dtype)).sample


def config_size(value) -> int:
    """A diffusers ``sample_size`` (an int or a [h, w] pair) as one int."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _unet_sample_shape(config) -> tuple[int, ...]:
    return (int(config.in_channels), config_size(config.sample_size), config_size(config.sample_size))


def _unet_mid_shape(config) -> tuple[int, ...]:
    """[C, h, w] of a diffusers UNet's mid block: the last width, downsampled once per level but the last."""
    side = config_size(config.sample_size) // 2 ** (len(config.block_out_channels) - 1)
    return (int(config.block_out_channels[-1]), side, side)
