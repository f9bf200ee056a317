"""A small class-conditional MLP denoiser for 2-D data, as a diffusers model.

``ToyMLP`` is a ``ModelMixin`` + ``ConfigMixin`` so it saves and loads like any diffusers model
(``save_pretrained`` / ``from_pretrained``, safetensors) and ``load_denoiser`` finds it by its
``_class_name``. Its timestep is a float in the backbone's own range (0..1000 for flow schedules,
0..999 for DDPM tables), embedded with diffusers' sinusoidal ``Timesteps`` as the UNets do.
``ToyDenoiser`` puts it behind the common ``Denoiser`` interface. Like diffusers' models it supports
``enable_gradient_checkpointing()`` (each residual block is recomputed in backward, through diffusers'
non-reentrant ``torch.utils.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.schedules import NoiseSchedule, Prediction


@dataclass
class ToyMLPOutput(BaseOutput):
    """Output of ``ToyMLP``.

    Attributes:
        sample: [B, data_dim] the prediction in the model's trained parameterization.
    """

    sample: Tensor


class ToyBlock(nn.Module):
    """Residual SiLU MLP block with an additive (time + class) embedding: ``h + f(h, emb)``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(F.silu(h)) + self.emb_proj(F.silu(emb))
        return h + self.fc2(F.silu(z))


class ToyMLP(ModelMixin, ConfigMixin):
    """Class-conditional residual MLP: (sample [B, D], timestep [B], class_labels [B]) -> [B, D].

    Args:
        num_classes: number of real classes; the embedding table has ``num_classes + 1`` rows, the
            last one (index ``num_classes``) being the null class for classifier-free guidance.
        hidden: width of every hidden layer.
        layers: number of residual blocks (>= 1).
        time_embed_dim: size of the sinusoidal timestep features.
        data_dim: dimension of the data (2 for the toy mixtures).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, num_classes: int = 4, hidden: int = 256, layers: int = 3,
                 time_embed_dim: int = 64, data_dim: int = 2) -> None:
        super().__init__()
        if num_classes < 1 or hidden < 1 or layers < 1 or time_embed_dim < 2 or data_dim < 1:
            raise ValueError(f"ToyMLP needs num_classes, hidden, layers, data_dim >= 1 and "
                             f"time_embed_dim >= 2; got num_classes={num_classes}, hidden={hidden}, "
                             f"layers={layers}, time_embed_dim={time_embed_dim}, data_dim={data_dim}")
        self.time_proj = Timesteps(time_embed_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embed_dim, hidden)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden)
        self.proj_in = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList([ToyBlock(hidden) for _ in range(layers)])
        self.proj_out = nn.Linear(hidden, data_dim)
        self.gradient_checkpointing = False  # set by diffusers' enable_gradient_checkpointing()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                return_dict: bool = True) -> ToyMLPOutput | tuple[Tensor]:
        """Predict at noisy ``sample`` [B, D], float ``timestep`` [B] (or scalar), ``class_labels`` [B].

        Args:
            class_labels: long [B] in ``0 .. num_classes`` (``num_classes`` = null); None means
                the null class for every sample.
        Returns:
            ``ToyMLPOutput(sample=[B, D])``, or a 1-tuple when ``return_dict`` is False.
        """
        b = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.reshape(1).expand(b) if timestep.dim() == 0 else timestep.reshape(b)
        if class_labels is None:
            class_labels = torch.full((b,), self.config.num_classes, device=sample.device, dtype=torch.long)
        t_emb = self.time_proj(timestep).to(self.proj_in.weight.dtype)
        emb = self.time_embedding(t_emb) + self.class_embedding(class_labels.to(sample.device).long())
        h = self.proj_in(sample.to(self.proj_in.weight.dtype))
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:  # recompute in backward
                h = self._gradient_checkpointing_func(block, h, emb)
            else:
                h = block(h, emb)
        out = self.proj_out(F.silu(h)).to(sample.dtype)
        return ToyMLPOutput(sample=out) if return_dict else (out,)


class ToyDenoiser(Denoiser):
    """``ToyMLP`` behind ``Denoiser``: class labels from ``cond`` (None -> the null class).

    Its default features are the last residual block's output (``blocks.{layers - 1}``, [B, hidden]).
    """

    default_feature_modules = ("blocks.0",)

    def __init__(self, backbone: ToyMLP, schedule: NoiseSchedule, prediction: Prediction) -> None:
        super().__init__(backbone, schedule, prediction)
        self.default_feature_modules = (f"blocks.{len(backbone.blocks) - 1}",)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (int(self.backbone.config.data_dim),)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (int(self.backbone.config.hidden),)

    def raw(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.backbone(x_t, self.model_time(t, x_t), class_labels=cond.class_labels).sample
