"""Built-in real-size architectures for ``stepdistill plan backbone=...``: config dicts only.

Each preset names the diffusers / transformers classes of a published text-to-image (or video)
stack and the constructor arguments of their published configs, so the planner can build the models
on the ``meta`` device (shapes, no weights, no download). Parameter counts of the denoisers (tested):
SD1.5 UNet 859,520,964; SDXL UNet 2,567,463,684; SD3-medium 2,028,328,000; SD3.5-medium 2,243,171,520;
SD3.5-large 8,056,627,520 (with its published ``qk_norm="rms_norm"``: 38 layers x 4 RMSNorm x 64 weights
more than the same architecture without it);
Flux.1-dev 11,901,408,320; Wan2.1 1.3B 1,418,996,800; Wan2.1 14B 14,288,491,584.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stepdistill.errors import StepdistillError


@dataclass(frozen=True)
class Component:
    """One model of a stack: a diffusers class and its ``from_config`` dict, or a transformers model
    class built from its ``config_class(**config)``."""

    library: str          # "diffusers" | "transformers"
    class_name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    """A stack's models and the shapes its denoiser sees.

    Attributes:
        name: the ``backbone=`` value.
        backbone: the denoiser (UNet / transformer).
        text_encoders: the prompt encoders (run once per step unless embeddings are cached).
        vae: the autoencoder (needed to encode real images: GAN terms, f-distill, LCM).
        resolution: the native (height, width) in pixels.
        frames: video frames (None for images).
        text_tokens: the prompt-embedding length the denoiser attends to.
        latent_channels: channels of one latent (before a transformer's own patching / packing).
        vae_scale: pixels per latent (spatially).
        vae_temporal_scale: frames per latent frame (video; the first frame alone).
    """

    name: str
    backbone: Component
    text_encoders: tuple[Component, ...]
    vae: Component
    resolution: tuple[int, int]
    text_tokens: int
    latent_channels: int
    frames: int | None = None
    vae_scale: int = 8
    vae_temporal_scale: int = 4


_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
_CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
_SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
_SD3_VAE = {**_SD_VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
            "sample_size": 1024}

_SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8)
_SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                  addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
_SD35_MEDIUM = {**_SD3_MEDIUM, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)),
                "qk_norm": "rms_norm"}
_SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                   attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                   caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                   qk_norm="rms_norm")
_FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))
_WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads")
_WAN_14B = {**_WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}


def _clip(projection: bool, config: dict[str, Any]) -> Component:
    return Component("transformers", "CLIPTextModelWithProjection" if projection else "CLIPTextModel", config)


_SD3_ENCODERS = (_clip(True, _CLIP_L), _clip(True, _CLIP_BIGG), Component("transformers", "T5EncoderModel", _T5_XXL))

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("sd15", Component("diffusers", "UNet2DConditionModel", _SD15_UNET), (_clip(False, _CLIP_L),),
           Component("diffusers", "AutoencoderKL", _SD_VAE), resolution=(512, 512), text_tokens=77, latent_channels=4),
    Preset("sdxl", Component("diffusers", "UNet2DConditionModel", _SDXL_UNET),
           (_clip(False, _CLIP_L), _clip(True, _CLIP_BIGG)),
           Component("diffusers", "AutoencoderKL", {**_SD_VAE, "sample_size": 1024}), resolution=(1024, 1024),
           text_tokens=77, latent_channels=4),
    Preset("sd3-medium", Component("diffusers", "SD3Transformer2DModel", _SD3_MEDIUM), _SD3_ENCODERS,
           Component("diffusers", "AutoencoderKL", _SD3_VAE), resolution=(1024, 1024), text_tokens=77 + 256,
           latent_channels=16),
    Preset("sd35-medium", Component("diffusers", "SD3Transformer2DModel", _SD35_MEDIUM), _SD3_ENCODERS,
           Component("diffusers", "AutoencoderKL", _SD3_VAE), resolution=(1024, 1024), text_tokens=77 + 256,
           latent_channels=16),
    Preset("sd35-large", Component("diffusers", "SD3Transformer2DModel", _SD35_LARGE), _SD3_ENCODERS,
           Component("diffusers", "AutoencoderKL", _SD3_VAE), resolution=(1024, 1024), text_tokens=77 + 256,
           latent_channels=16),
    Preset("flux-dev", Component("diffusers", "FluxTransformer2DModel", _FLUX_DEV),
           (_clip(False, _CLIP_L), Component("transformers", "T5EncoderModel", _T5_XXL)),
           Component("diffusers", "AutoencoderKL", _SD3_VAE), resolution=(1024, 1024), text_tokens=512,
           latent_channels=16),
    Preset("wan21-1.3b", Component("diffusers", "WanTransformer3DModel", _WAN_1_3B),
           (Component("transformers", "UMT5EncoderModel", _UMT5_XXL),),
           Component("diffusers", "AutoencoderKLWan", {}), resolution=(480, 832), frames=81, text_tokens=512,
           latent_channels=16),
    Preset("wan21-14b", Component("diffusers", "WanTransformer3DModel", _WAN_14B),
           (Component("transformers", "UMT5EncoderModel", _UMT5_XXL),),
           Component("diffusers", "AutoencoderKLWan", {}), resolution=(480, 832), frames=81, text_tokens=512,
           latent_channels=16),
)}

#: experiment directory names that are presets (experiment=sdxl/dmd2 sizes the sdxl preset)
EXPERIMENT_PRESETS = {"sd15": "sd15", "sdxl": "sdxl", "sd3": "sd3-medium", "sd3-medium": "sd3-medium",
                      "sd35": "sd35-large", "sd35-large": "sd35-large", "sd35-medium": "sd35-medium",
                      "flux": "flux-dev", "flux-dev": "flux-dev",
                      "wan21-1.3b": "wan21-1.3b", "wan21-14b": "wan21-14b"}


def preset(name: str) -> Preset:
    """The preset ``name``, or a one-line error listing the allowed ones."""
    if name not in PRESETS:
        raise StepdistillError(f"unknown backbone preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]
