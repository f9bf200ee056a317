"""One interface over every backbone: ``Denoiser.forward(x_t, t, cond, out=...)``.

An adapter knows how to call its backbone (``raw``) and in which parameterization the backbone
answers (``prediction``); the base class turns that answer into whatever the caller asks for,
through x0 in float64 (``NoiseSchedule.convert``), so no algorithm ever branches on eps / v / flow.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.guidance_embedding import embedding_dim, guidance_condition
from stepdistill.schedules import NoiseSchedule, Prediction


class Denoiser(nn.Module):
    """A backbone behind the common interface.

    Args:
        backbone: the diffusers (or toy) model.
        schedule: the noise schedule the backbone was trained with.
        prediction: the backbone's native output parameterization.
    """

    #: backbone submodule names whose outputs ``features`` returns by default
    default_feature_modules: tuple[str, ...] = ()

    def __init__(self, backbone: nn.Module, schedule: NoiseSchedule, prediction: Prediction) -> None:
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction = Prediction(prediction)

    def raw(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The backbone's own output for continuous times ``t`` [B]."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample (no batch dim), e.g. (4, 64, 64) for SD1.5 latents, (2,) for toy2d."""
        raise NotImplementedError(f"{type(self).__name__} does not know its sample shape")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample's default feature (``features()[default_feature_modules[0]]``)."""
        raise NotImplementedError(f"{type(self).__name__} does not know its feature shape")

    def model_time(self, t: Tensor, x_t: Tensor) -> Tensor:
        """Continuous ``t`` (scalar or [B]) as the backbone's float timestep [B] on x_t's device."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        return self.schedule.to_model_time(t).to(device=x_t.device, dtype=torch.float32)

    def forward(self, x_t: Tensor, t: Tensor | float, cond: Conditioning, *,
                out: Prediction = Prediction.X0) -> Tensor:
        """Predict ``out`` (x0 by default) at (x_t [B, ...], t [B] or scalar, cond).

        Returns:
            [B, ...] in x_t's dtype.
        """
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        pred = self._raw_guided(x_t, t, cond)
        return self.schedule.convert(pred, x_t, t, self.prediction, out).to(x_t.dtype)

    def _raw_guided(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """``raw``, with ``cond.guidance`` fed to the guidance embedding when the backbone has one;
        ``x_t`` enters in the backbone's weight dtype (a bf16 / fp16 teacher, ``teacher.dtype``)."""
        x_t = x_t.to(weight_dtype(self.backbone))
        if embedding_dim(self.backbone) is None:
            return self.raw(x_t, t, cond)
        if cond.guidance is None:
            raise ValueError("this network has a guidance embedding: give the scale with cond.with_guidance(s)")
        with guidance_condition(self.backbone, cond.guidance):
            return self.raw(x_t, t, cond)

    def features(self, x_t: Tensor, t: Tensor | float, cond: Conditioning,
                 modules: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Outputs of backbone submodules (forward hooks) for one forward at (x_t, t, cond).

        Args:
            modules: dotted names inside ``backbone``; defaults to ``default_feature_modules``.
        Returns:
            name -> activation (the first tensor of the module's output).
        """
        names = list(modules or self.default_feature_modules)
        if not names:
            raise ValueError(f"{type(self).__name__} has no default feature modules; pass modules=[...]")
        found: dict[str, Tensor] = {}
        submodules = dict(self.backbone.named_modules())
        missing = [n for n in names if n not in submodules]
        if missing:
            raise KeyError(f"unknown backbone modules {missing}; e.g. {list(submodules)[1:8]}")

        def hook(name: str):
            def fn(_module, _inputs, output):
                found[name] = output[0] if isinstance(output, (tuple, list)) else output
            return fn

        handles = [submodules[n].register_forward_hook(hook(n)) for n in names]
        try:
            self._raw_guided(x_t, torch.as_tensor(t, device=x_t.device, dtype=torch.float64).expand(x_t.shape[0]),
                             cond)
        finally:
            for h in handles:
                h.remove()
        return {n: found[n] for n in names}


def weight_dtype(backbone: nn.Module) -> torch.dtype:
    """The dtype of ``backbone``'s own floating-point weights (float32 when it has none); LoRA adapter
    weights (``.lora_`` names: fp32 trainable adapters over a bf16 base) do not count."""
    for name, p in backbone.named_parameters():
        if p.is_floating_point() and ".lora_" not in name:
            return p.dtype
    return torch.float32
