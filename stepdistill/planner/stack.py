"""A text-to-image (or video) stack built on the ``meta`` device: shapes and parameter counts, no weights.

``MetaStack.from_preset`` builds a built-in preset (``presets.py``); ``MetaStack.from_dir`` reads a local
diffusers directory's config files only (``model_index.json``, the denoiser's ``unet/`` or
``transformer/`` ``config.json``, the text encoders' and the VAE's configs), so a job can be sized
before its weights are downloaded. Counted here:

- the denoiser's parameters, and those of the text encoders and the VAE (built on ``meta`` too);
- LoRA adapters of rank r on the modules peft would match (``lora_parameters``): r (in + out) per
  ``Linear``, r (in k + out) per convolution (peft's A is a k x k conv to r channels, B a 1 x 1
  conv), r (num + dim) per ``Embedding``; equal to peft's own count (tested);
- the largest FSDP unit (``largest_unit``): the blocks ``training/sharding.py`` shards one by one,
  each holding its parameters minus those of the units inside it;
- per-sample activation bytes (``activations``), traced on ``meta`` by ``activations.trace``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from torch import Tensor, nn

from stepdistill.denoisers.loading import ADAPTERS, find_model_dir, resolve_local_dir, wrap_backbone
from stepdistill.errors import StepdistillError
from stepdistill.heads import DiscriminatorHead
from stepdistill.planner.activations import Trace, trace
from stepdistill.planner.presets import Component, Preset, preset
from stepdistill.schedules import NoiseSchedule
from stepdistill.training.sharding import block_classes

#: LoRA targets when a config names none: the shipped lcm_lora list, plus the text stream's projections
#: of joint transformers (SD3, Flux) and Flux's single-block MLP, and Wan's feed-forward names
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                     "time_emb_proj")
_JOINT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff_context.net.0.proj", "ff_context.net.2")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": UNET_LORA_TARGETS,
    "UNet2DModel": UNET_LORA_TARGETS,
    "SD3Transformer2DModel": UNET_LORA_TARGETS + _JOINT,
    "FluxTransformer2DModel": UNET_LORA_TARGETS + _JOINT + ("proj_mlp",),
    "WanTransformer3DModel": ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"),
}
#: denoisers whose inputs the planner can make (and so trace)
SUPPORTED = tuple(LORA_TARGETS)
#: T5 sequence lengths of the pipelines (SD3's ``max_sequence_length`` default, Flux's)
_T5_TOKENS = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512}


def build(component: Component) -> nn.Module:
    """``component`` on the ``meta`` device (no memory, no weights)."""
    library = {"diffusers": diffusers, "transformers": transformers}[component.library]
    cls = getattr(library, component.class_name, None)
    if cls is None:
        raise StepdistillError(f"{component.library} has no class {component.class_name!r}; upgrade "
                               f"{component.library} or use another teacher")
    with torch.device("meta"):
        if component.library == "diffusers":
            return cls.from_config(component.config)
        return cls(cls.config_class(**component.config))


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class MetaStack:
    """A stack's models on ``meta`` and the shapes its denoiser sees.

    Attributes:
        name: the preset name or the directory.
        backbone: the denoiser on ``meta``.
        text_encoder_parameters: all text encoders together.
        vae_parameters: the autoencoder.
        resolution: (height, width) in pixels the stack natively generates.
        frames: video frames (None: images).
        text_tokens: the prompt embedding length the denoiser attends to.
        latent_channels: channels of one VAE latent.
        vae_scale: pixels per latent pixel; vae_temporal_scale: frames per latent frame (video).
    """

    name: str
    backbone: nn.Module
    text_encoder_parameters: int
    vae_parameters: int
    resolution: tuple[int, int]
    text_tokens: int
    latent_channels: int
    frames: int | None = None
    vae_scale: int = 8
    vae_temporal_scale: int = 4
    _traces: dict[tuple, Trace] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_preset(cls, preset: Preset) -> MetaStack:
        encoders = sum(parameter_count(build(c)) for c in preset.text_encoders)
        return cls(preset.name, build(preset.backbone), encoders, parameter_count(build(preset.vae)),
                   preset.resolution, preset.text_tokens, preset.latent_channels, preset.frames,
                   preset.vae_scale, preset.vae_temporal_scale)

    @classmethod
    def from_dir(cls, path: str | Path) -> MetaStack:
        """The stack of a local diffusers directory, from its config files alone."""
        root = resolve_local_dir(path)
        config = _read_json(find_model_dir(root) / "config.json")
        name = config.get("_class_name")
        if name not in SUPPORTED:
            raise StepdistillError(f"stepdistill plan cannot size a {name!r} denoiser (in {str(root)!r}); "
                                   f"supported: {', '.join(SUPPORTED)}")
        backbone = build(Component("diffusers", name, config))
        index = _read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
        encoders = [_transformers_model(root / key, value[1]) for key, value in sorted(index.items())
                    if key.startswith("text_encoder") and isinstance(value, list) and value[1]]
        vae = _diffusers_model(root / "vae") if (root / "vae" / "config.json").is_file() else None
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None and \
            hasattr(vae.config, "block_out_channels") else 8
        clip = [e.config.max_position_embeddings for e in encoders if "CLIP" in type(e).__name__]
        tokens = (max(clip) if clip else 77) + _T5_TOKENS.get(index.get("_class_name", ""), 0)
        if name == "FluxTransformer2DModel":
            tokens = _T5_TOKENS["FluxPipeline"]
        channels = int(config.get("in_channels", 4)) // (4 if name == "FluxTransformer2DModel" else 1)
        side = int(config.get("sample_size") or 128)
        side = side[0] if isinstance(side, (list, tuple)) else side
        video = name == "WanTransformer3DModel"
        return cls(str(root), backbone, sum(parameter_count(e) for e in encoders),
                   parameter_count(vae) if vae is not None else 0,
                   (480, 832) if video else (side * scale, side * scale), tokens, channels,
                   frames=81 if video else None, vae_scale=scale)

    # ------------------------------------------------------------------ counts
    @cached_property
    def parameters(self) -> int:
        """The denoiser's parameters."""
        return parameter_count(self.backbone)

    @property
    def class_name(self) -> str:
        return type(self.backbone).__name__

    def default_lora_targets(self) -> tuple[str, ...]:
        return LORA_TARGETS[self.class_name]

    def lora_parameters(self, rank: int, targets: list[str] | str | None = None) -> int:
        """Parameters of rank-``rank`` LoRA adapters on the modules ``targets`` names (peft's matching:
        a module whose name is, or ends with ``.`` + , a listed name; a string is a full-match regex)."""
        targets = self.default_lora_targets() if not targets else targets
        total, matched = 0, 0
        for name, module in self.backbone.named_modules():
            if not name or not _matches(name, targets):
                continue
            size = _lora_size(module, int(rank))
            if size is not None:
                total, matched = total + size, matched + 1
        if not matched:
            raise StepdistillError(f"LoRA target modules {targets} match no layer of {self.class_name}; "
                                   f"e.g. {list(self.default_lora_targets())}")
        return total

    @cached_property
    def largest_unit(self) -> int:
        """Parameters of the largest FSDP unit (``training/sharding.py``'s blocks, each without the
        units nested in it): what one all-gather brings in."""
        blocks = block_classes(self.backbone)
        units = [m for m in self.backbone.modules() if type(m).__name__ in blocks or hasattr(m, "_no_split_modules")]
        owned: set[int] = set()
        largest = 0
        for unit in reversed(units):  # inner units first: a unit owns what no inner unit took
            params = [p for p in unit.parameters() if id(p) not in owned]
            owned.update(id(p) for p in params)
            largest = max(largest, sum(p.numel() for p in params))
        return largest

    def head_parameters(self, width: int | None) -> int:
        """The DMD2 discriminator head on this denoiser's default features (its Denoiser adapter's
        ``feature_shape``); 0 for denoisers without one (no GAN head possible)."""
        shape = self.feature_shape()
        if shape is None:
            return 0
        with torch.device("meta"):
            return parameter_count(DiscriminatorHead(shape, width))

    def feature_shape(self) -> tuple[int, ...] | None:
        if self.class_name not in ADAPTERS:
            return None
        schedule = NoiseSchedule.from_diffusers({"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                 "beta_start": 0.00085, "beta_end": 0.012})
        return tuple(wrap_backbone(self.backbone, schedule).feature_shape)

    # ------------------------------------------------------------------ activations
    def latent_shape(self, resolution: tuple[int, int], frames: int | None) -> tuple[int, ...]:
        """[C, (F,) h, w] of one latent at ``resolution`` pixels (and ``frames`` for video)."""
        h, w = resolution
        step = self.vae_scale * _patch(self.backbone)
        if h % step or w % step:
            raise StepdistillError(f"resolution {h}x{w} is not a multiple of {step} pixels (the VAE's "
                                   f"{self.vae_scale} x the denoiser's patch): choose e.g. {h // step * step}")
        if frames is None:
            return (self.latent_channels, h // self.vae_scale, w // self.vae_scale)
        return (self.latent_channels, (frames - 1) // self.vae_temporal_scale + 1, h // self.vae_scale,
                w // self.vae_scale)

    def activations(self, resolution: tuple[int, int], frames: int | None, dtype: torch.dtype,
                    checkpointing: bool) -> Trace:
        """Per-sample activation bytes (``activations.trace`` at batch 1; memoised)."""
        key = (tuple(resolution), frames, dtype, bool(checkpointing))
        if key not in self._traces:
            latent = self.latent_shape(resolution, frames if self.frames is not None else None)
            nn.Module.to(self.backbone, dtype)  # (ModelMixin.to warns about fp32 modules: none on meta)
            self.backbone.requires_grad_(True)
            self._traces[key] = trace(self.backbone, self._input_maker(latent, dtype), checkpointing=checkpointing)
        return self._traces[key]

    def _input_maker(self, latent: tuple[int, ...], dtype: torch.dtype) -> Callable[[], dict[str, Any]]:
        c = self.backbone.config
        tokens = self.text_tokens

        def meta(*shape: int, dt: torch.dtype = dtype) -> Tensor:
            return torch.zeros(shape, device="meta", dtype=dt)

        t = meta(1, dt=torch.float32)
        name = self.class_name
        if name == "UNet2DConditionModel":
            def make() -> dict[str, Any]:
                kw: dict[str, Any] = dict(sample=meta(1, *latent), timestep=t,
                                          encoder_hidden_states=meta(1, tokens, c.cross_attention_dim))
                if c.get("addition_embed_type") == "text_time":
                    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
                    kw["added_cond_kwargs"] = {"text_embeds": meta(1, pooled), "time_ids": meta(1, 6)}
                return kw
        elif name == "UNet2DModel":
            def make() -> dict[str, Any]:
                labels = torch.zeros(1, device="meta", dtype=torch.long) if c.get("num_class_embeds") else None
                return dict(sample=meta(1, *latent), timestep=t, class_labels=labels)
        elif name == "SD3Transformer2DModel":
            def make() -> dict[str, Any]:
                return dict(hidden_states=meta(1, *latent), timestep=t,
                            encoder_hidden_states=meta(1, tokens, c.joint_attention_dim),
                            pooled_projections=meta(1, c.pooled_projection_dim))
        elif name == "FluxTransformer2DModel":
            def make() -> dict[str, Any]:
                n = latent[1] // 2 * (latent[2] // 2)
                kw = dict(hidden_states=meta(1, n, c.in_channels), timestep=t,
                          encoder_hidden_states=meta(1, tokens, c.joint_attention_dim),
                          pooled_projections=meta(1, c.pooled_projection_dim),
                          img_ids=meta(n, 3, dt=torch.float32), txt_ids=meta(tokens, 3, dt=torch.float32))
                return kw | ({"guidance": meta(1, dt=torch.float32)} if c.guidance_embeds else {})
        else:  # WanTransformer3DModel
            def make() -> dict[str, Any]:
                return dict(hidden_states=meta(1, *latent), timestep=t,
                            encoder_hidden_states=meta(1, tokens, c.text_dim))
        return make


@cache
def preset_stack(name: str) -> MetaStack:
    """The preset ``name`` built once per process (its activation traces are memoised with it)."""
    return MetaStack.from_preset(preset(name))


def _matches(name: str, targets: list[str] | tuple[str, ...] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == key or name.endswith("." + key) for key in targets)


def _lora_size(module: nn.Module, r: int) -> int | None:
    """Adapter parameters peft adds to ``module`` (None: a layer type peft does not adapt)."""
    if isinstance(module, nn.Linear):
        return r * (module.in_features + module.out_features)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return r * module.in_channels * kernel + module.out_channels * r
    if isinstance(module, nn.Embedding):
        return r * (module.num_embeddings + module.embedding_dim)
    return None


def _patch(backbone: nn.Module) -> int:
    """The denoiser's spatial patch (a UNet's downsamplings need 2^(levels-1); Flux packs 2 x 2)."""
    c = backbone.config
    name = type(backbone).__name__
    if name == "FluxTransformer2DModel":
        return 2
    if "UNet" in name:
        return 2 ** (len(c.block_out_channels) - 1)
    patch = c.get("patch_size", 1)
    return int(patch[-1] if isinstance(patch, (list, tuple)) else patch)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StepdistillError(f"unreadable config {str(path)!r}: {e}") from None


def _transformers_model(directory: Path, class_name: str) -> nn.Module:
    config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise StepdistillError(f"transformers has no class {class_name!r} (in {str(directory)!r})")
    with torch.device("meta"):
        return cls(config)


def _diffusers_model(directory: Path) -> nn.Module:
    config = _read_json(directory / "config.json")
    return build(Component("diffusers", config["_class_name"], config))
