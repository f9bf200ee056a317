"""The three roles every algorithm is written against: Teacher, Generator, Critic.

- ``Teacher``: frozen, eval mode, no grad; ``predict`` with classifier-free guidance.
- ``Generator``: a 1..K-step sampler, initialised as a copy of a denoiser; returns x0.
- ``Critic``: the fake-score denoiser (a trainable copy of the teacher's denoiser).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.guidance import guided_predict
from stepdistill.heads import DiscriminatorHead
from stepdistill.sampling import ode_sample, renoise_sample
from stepdistill.schedules import NoiseSchedule, Prediction


class Teacher(nn.Module):
    """A frozen denoiser with classifier-free guidance.

    Args:
        denoiser: the teacher network (it is frozen in place).
        guidance_scale: default CFG scale s in ``u + s (c - u)``; 1 means no guidance.
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float = 1.0) -> None:
        super().__init__()
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.guidance_scale = float(guidance_scale)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def train(self, mode: bool = True) -> Teacher:  # a teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def predict(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, *,
                out: Prediction = Prediction.X0, guidance_scale: float | Tensor | None = None) -> Tensor:
        """The guided prediction in ``out`` at (x_t [B, ...], t [B], cond)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return guided_predict(self.denoiser, x_t, t, cond, scale, out=out)

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Conditioning, steps: int, *,
               guidance_scale: float | None = None, progress: bool = False) -> Tensor:
        """The teacher's ODE sample (DDIM for VP, Euler for flow) with ``steps`` steps and CFG."""
        return ode_sample(lambda x, t: self.predict(x, t, cond, guidance_scale=guidance_scale),
                          self.schedule, noise, steps, progress=progress)

    def nfe(self, steps: int, guidance_scale: float | None = None) -> int:
        """Network evaluations per sample for ``steps`` steps (twice with CFG)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return steps * (1 if scale == 1.0 else 2)


class Generator(nn.Module):
    """A 1..K-step generator: ``forward(x_t, t, cond) -> x0``.

    Args:
        denoiser: initial network; deep-copied unless ``copy=False`` (LoRA / adapters on a shared base).
        steps: the default number of sampling steps K.
        t_max: the time the first step starts from (1.0: pure noise; SiD-LSG uses 0.625).
    """

    def __init__(self, denoiser: Denoiser, steps: int = 1, t_max: float = 1.0, copy: bool = True) -> None:
        super().__init__()
        self.denoiser = _trainable_copy(denoiser) if copy else denoiser
        self.steps = int(steps)
        self.t_max = float(t_max)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning) -> Tensor:
        return self.denoiser(x_t, t, cond, out=Prediction.X0)

    def grid(self, steps: int | None = None) -> Tensor:
        """Start times of the K steps, evenly spaced from ``t_max`` (DMD2: 999, 749, 499, 249)."""
        k = self.steps if steps is None else int(steps)
        return self.schedule.timesteps(k, self.t_max)[:-1]

    def sample(self, noise: Tensor, cond: Conditioning, steps: int | None = None, *,
               generator: torch.Generator | None = None) -> Tensor:
        """x0 after ``steps`` generator steps from ``noise`` [B, ...] (re-noising between steps)."""
        return renoise_sample(lambda x, t: self(x, t, cond), self.schedule, noise, self.grid(steps),
                              generator=generator)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


class Critic(nn.Module):
    """The fake-score denoiser (a trainable copy of the teacher's) with an optional GAN head.

    Args:
        denoiser: initial network (deep-copied unless ``copy=False``).
        head: add a ``DiscriminatorHead`` on the denoiser's default features (DMD2's GAN).
        head_width: the head's hidden width (default: the feature width).
    """

    def __init__(self, denoiser: Denoiser, head: bool = False, head_width: int | None = None,
                 copy: bool = True) -> None:
        super().__init__()
        self.denoiser = _trainable_copy(denoiser) if copy else denoiser
        self.head = DiscriminatorHead(self.denoiser.feature_shape, head_width) if head else None

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, *,
                out: Prediction = Prediction.X0, logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The fake score in ``out``; with ``logits=True`` also the head's logits [B] from the same
        forward (features captured by a hook). Calls go through ``forward`` so DDP syncs them."""
        if not logits:
            return self.denoiser(x_t, t, cond, out=out)
        if self.head is None:
            raise ValueError("this critic has no discriminator head (build it with head=True)")
        name = self.denoiser.default_feature_modules[0]
        captured: list[Tensor] = []
        module = dict(self.denoiser.backbone.named_modules())[name]
        handle = module.register_forward_hook(
            lambda _m, _i, o: captured.append(o[0] if isinstance(o, (tuple, list)) else o))
        try:
            pred = self.denoiser(x_t, t, cond, out=out)
        finally:
            handle.remove()
        return pred, self.head(captured[0])

    def features(self, x_t: Tensor, t: Tensor | float, cond: Conditioning,
                 modules: list[str] | None = None) -> dict[str, Tensor]:
        return self.denoiser.features(x_t, t, cond, modules)


def _trainable_copy(denoiser: Denoiser) -> Denoiser:
    out = copy.deepcopy(denoiser)
    out.train().requires_grad_(True)
    return out
