"""Noise schedules on one time convention, and conversions between parameterizations.

Time is continuous, ``t`` in [0, 1], ``t = 0`` is data and ``t = 1`` is (almost) pure noise, and
``x_t = alpha(t) * x0 + sigma(t) * eps``. Two families:

- ``vp``: a DDPM ``alphas_cumprod`` table of N entries (SD1.5, SDXL, our digits teacher). ``t``
  maps to the backbone's timestep ``t * (N - 1)``; between table entries ``log alphas_cumprod`` is
  interpolated linearly, so integer timesteps give the table's values exactly.
- ``flow``: rectified flow (SD3, Flux), ``alpha = 1 - t``, ``sigma = t``, backbone timestep
  ``t * N``. The optional time shift ``t' = s t / (1 + (s - 1) t)`` acts on inference grids and
  training-time draws (``shift_time``), as diffusers' FlowMatchEulerDiscreteScheduler does.

Every conversion goes through x0 in float64 (``convert``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import Tensor


class Prediction(str, Enum):
    """What a network predicts: the clean sample, the noise, VP's v, or the flow velocity dx_t/dt."""

    X0 = "x0"
    EPS = "eps"
    V = "v"
    FLOW = "flow"

    @classmethod
    def from_diffusers(cls, prediction_type: str) -> Prediction:
        """Map a diffusers ``prediction_type`` ("epsilon", "v_prediction", "sample", "flow_prediction")."""
        table = {"epsilon": cls.EPS, "v_prediction": cls.V, "sample": cls.X0,
                 "flow_prediction": cls.FLOW, "flow": cls.FLOW}
        if prediction_type not in table:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {sorted(table)}")
        return table[prediction_type]

    def to_diffusers(self) -> str:
        return {"x0": "sample", "eps": "epsilon", "v": "v_prediction", "flow": "flow_prediction"}[self.value]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample [B] (or scalar) tensor so it broadcasts against ``like`` [B, ...]."""
    v = v.reshape(-1) if v.dim() > 0 else v.reshape(1)
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


@dataclass
class NoiseSchedule:
    """A VP (DDPM table) or flow-matching schedule in continuous time ``t`` in [0, 1].

    Args:
        kind: "vp" or "flow".
        alphas_cumprod: float64 [N] table for "vp" (ignored for "flow").
        num_train_timesteps: N, the backbone's timestep range (1000 for SD and SD3).
        shift: flow time shift s (1 = none); used by ``timesteps`` and ``shift_time``.
        prediction: the parameterization the schedule's model was trained in (informative; the
            denoiser adapter owns the real one).
    """

    kind: str = "vp"
    alphas_cumprod: Tensor | None = None
    num_train_timesteps: int = 1000
    shift: float = 1.0
    prediction: Prediction = Prediction.EPS
    _log_ab: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("vp", "flow"):
            raise ValueError(f"unknown schedule kind {self.kind!r}; expected 'vp' or 'flow'")
        self.prediction = Prediction(self.prediction)
        if self.kind == "vp":
            if self.alphas_cumprod is None:
                raise ValueError("a 'vp' schedule needs an alphas_cumprod table")
            ab = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).clamp(1e-12, 1.0)
            self.alphas_cumprod = ab
            self.num_train_timesteps = int(ab.numel())
            self._log_ab = ab.log()

    # ----------------------------------------------------------------- constructors
    @classmethod
    def vp(cls, betas: str = "scaled_linear", n: int = 1000, beta_start: float = 0.00085,
           beta_end: float = 0.012, prediction: Prediction = Prediction.EPS) -> NoiseSchedule:
        """A DDPM schedule built like diffusers' ``beta_schedule`` options."""
        if betas == "linear":
            b = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
        elif betas == "scaled_linear":
            b = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
        elif betas == "squaredcos_cap_v2":
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            b = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)],
                             dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta schedule {betas!r}; expected linear, scaled_linear or squaredcos_cap_v2")
        return cls("vp", torch.cumprod(1 - b, 0), n, prediction=prediction)

    @classmethod
    def flow(cls, shift: float = 1.0, n: int = 1000) -> NoiseSchedule:
        """A rectified-flow schedule with velocity prediction and an optional time shift."""
        return cls("flow", None, n, shift=shift, prediction=Prediction.FLOW)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> NoiseSchedule:
        """Build from a diffusers scheduler (or its config): DDPM, DDIM, Euler, LCM, FlowMatchEuler."""
        config = getattr(scheduler, "config", scheduler)
        name = type(scheduler).__name__ if hasattr(scheduler, "config") else config.get("_class_name", "")
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        n = int(get("num_train_timesteps", 1000))
        if "FlowMatch" in name:
            return cls.flow(shift=float(get("shift", 1.0) or 1.0), n=n)
        prediction = Prediction.from_diffusers(get("prediction_type", "epsilon") or "epsilon")
        ab = getattr(scheduler, "alphas_cumprod", None)
        if ab is None:
            trained = get("trained_betas", None)
            if trained is not None:
                ab = torch.cumprod(1 - torch.as_tensor(trained, dtype=torch.float64), 0)
            else:
                s = cls.vp(get("beta_schedule", "linear"), n, float(get("beta_start", 1e-4)),
                           float(get("beta_end", 0.02)), prediction)
                ab = s.alphas_cumprod
                if get("rescale_betas_zero_snr", False):
                    ab = _zero_terminal_snr(ab)
        return cls("vp", torch.as_tensor(ab, dtype=torch.float64), n, prediction=prediction)

    # ----------------------------------------------------------------- coefficients
    def _log_alpha_bar(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """log alphas_cumprod at continuous t, and its derivative d/dt (piecewise linear)."""
        pos = t.to(torch.float64).clamp(0, 1) * (self.num_train_timesteps - 1)
        lo = pos.floor().clamp(max=self.num_train_timesteps - 2).long()
        frac = pos - lo
        table = self._log_ab.to(pos.device)
        a, b = table[lo], table[lo + 1]
        return a + frac * (b - a), (b - a) * (self.num_train_timesteps - 1)

    def alpha(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            return 1 - t
        return (0.5 * self._log_alpha_bar(t)[0]).exp()

    def sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            return t.clone()
        return (1 - self._log_alpha_bar(t)[0].exp()).clamp_min(0).sqrt()

    def d_alpha(self, t: Tensor) -> Tensor:
        """d alpha / dt."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            return -torch.ones_like(t)
        log_ab, d_log_ab = self._log_alpha_bar(t)
        return 0.5 * (0.5 * log_ab).exp() * d_log_ab

    def d_sigma(self, t: Tensor) -> Tensor:
        """d sigma / dt."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "flow":
            return torch.ones_like(t)
        log_ab, d_log_ab = self._log_alpha_bar(t)
        ab = log_ab.exp()
        return -0.5 * ab * d_log_ab / (1 - ab).clamp_min(1e-12).sqrt()

    # ----------------------------------------------------------------- operations
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps, computed in float64 and returned in x0's dtype."""
        t = torch.as_tensor(t, device=x0.device)
        a, s = _bcast(self.alpha(t), x0), _bcast(self.sigma(t), x0)
        return (a * x0.double() + s * eps.double()).to(x0.dtype)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor, prediction: Prediction | str) -> Tensor:
        """The exact regression target of a ``prediction`` network for x_t = add_noise(x0, eps, t).

        x0 -> x0, eps -> eps, v -> alpha eps - sigma x0, flow -> d_alpha x0 + d_sigma eps (= eps - x0
        for rectified flow). Float64 inside, x0's dtype out.
        """
        prediction = Prediction(prediction)
        if prediction == Prediction.X0:
            return x0
        if prediction == Prediction.EPS:
            return eps
        t = torch.as_tensor(t, device=x0.device)
        if prediction == Prediction.V:
            a, s = _bcast(self.alpha(t), x0), _bcast(self.sigma(t), x0)
        else:
            a, s = _bcast(self.d_sigma(t), x0), -_bcast(self.d_alpha(t), x0)
        return (a * eps.double() - s * x0.double()).to(x0.dtype)

    def sample_time(self, n: int, *, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", t_min: float = 0.0, t_max: float = 1.0) -> Tensor:
        """Training times [n] in [t_min, t_max]: integer table steps for VP, shifted uniform for flow."""
        u = torch.rand(n, generator=generator, dtype=torch.float64).to(device)
        if self.kind == "vp":
            lo, hi = self._table_step(t_min), self._table_step(t_max)
            return self.from_model_time((lo + u * (hi - lo + 1)).floor().clamp(max=hi))
        return self.shift_time(t_min + u * (t_max - t_min)).clamp(1e-4, 1.0)

    def max_sample_time(self, t_max: float = 1.0) -> float:
        """The largest time :meth:`sample_time` draws with this ``t_max`` (table step or shifted)."""
        if self.kind == "vp":
            return float(self.from_model_time(torch.tensor(float(self._table_step(t_max)))))
        return float(self.shift_time(torch.tensor(float(t_max))).clamp(1e-4, 1.0))

    def t_from_sigma_ratio(self, ratio: Tensor) -> Tensor:
        """The time t [B] at which ``sigma(t) / alpha(t)`` equals ``ratio`` [B] (EDM's sigma of a
        VP or flow schedule), float64, clamped to [0, 1] beyond the schedule's range.

        Flow: sigma / alpha = t / (1 - t), so t = ratio / (1 + ratio). VP: alpha_bar(t) = 1 / (1 +
        ratio^2), found on the table's piecewise-linear log alpha_bar (the inverse of ``alpha``).
        """
        r = torch.as_tensor(ratio, dtype=torch.float64)
        if self.kind == "flow":
            return (r / (1 + r)).clamp(0.0, 1.0)
        target = -torch.log1p(r * r)  # log alpha_bar, decreasing in t
        neg = -self._log_ab.to(r.device)  # increasing
        n = self.num_train_timesteps
        hi = torch.searchsorted(neg, -target).clamp(1, n - 1)
        lo = hi - 1
        a, b = neg[lo], neg[hi]
        frac = ((-target - a) / (b - a).clamp_min(1e-300)).clamp(0.0, 1.0)
        return ((lo.double() + frac) / (n - 1)).clamp(0.0, 1.0)

    def _table_step(self, t: float) -> int:
        """The VP table step that training time ``t`` in [0, 1] rounds to."""
        return round(t * (self.num_train_timesteps - 1))

    def to_model_time(self, t: Tensor) -> Tensor:
        """The backbone's own timestep: ``t * (N - 1)`` for VP tables, ``t * N`` for flow (float)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        scale = self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps
        return t * scale

    def from_model_time(self, timestep: Tensor) -> Tensor:
        timestep = torch.as_tensor(timestep, dtype=torch.float64)
        scale = self.num_train_timesteps - 1 if self.kind == "vp" else self.num_train_timesteps
        return timestep / scale

    def shift_time(self, t: Tensor) -> Tensor:
        """Flow time shift t' = s t / (1 + (s - 1) t); identity for VP or s = 1."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.kind == "vp" or self.shift == 1.0:
            return t
        return self.shift * t / (1 + (self.shift - 1) * t)

    def timesteps(self, n: int, t_max: float = 1.0) -> Tensor:
        """An inference grid of ``n`` steps: ``n + 1`` descending times, the last one 0.

        VP: diffusers' "trailing" spacing on the first M = T0 + 1 table steps, T0 = round(t_max (N - 1))
        (n = 4 gives 999, 749, 499, 249 at t_max = 1; 699, 524, 349, 174 at t_max = 0.7), then 0:
        every time is on the table, as diffusers' schedulers need.
        Flow: ``t_max * shift_time(linspace(1, 0, n + 1))``.
        """
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {n}")
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {t_max}")
        if self.kind == "flow":
            return self.shift_time(torch.linspace(1, 0, n + 1, dtype=torch.float64)) * t_max
        top = round(t_max * (self.num_train_timesteps - 1)) + 1
        if top < n:
            raise ValueError(f"{n} steps do not fit below timestep {top - 1} (t_max={t_max})")
        steps = torch.round(torch.arange(top, 0, -top / n, dtype=torch.float64)) - 1
        return torch.cat([self.from_model_time(steps), torch.zeros(1, dtype=torch.float64)])

    def convert(self, pred: Tensor, x_t: Tensor, t: Tensor, src: Prediction | str,
                dst: Prediction | str) -> Tensor:
        """Convert a prediction between parameterizations, through x0, in float64.

        Args:
            pred: [B, ...] the network output in ``src`` parameterization.
            x_t: [B, ...] the noisy input it was computed from.
            t: [B] (or scalar) continuous times.
        Returns:
            [B, ...] the same prediction in ``dst``, in ``pred``'s dtype.
        """
        src, dst = Prediction(src), Prediction(dst)
        if src == dst:
            return pred
        x0 = self.to_x0(pred, x_t, t, src)
        return self.from_x0(x0, x_t, t, dst).to(pred.dtype)

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor, src: Prediction | str) -> Tensor:
        """x0 implied by a ``src`` prediction, float64."""
        src = Prediction(src)
        t = torch.as_tensor(t, device=x_t.device)
        p, x = pred.double(), x_t.double()
        a, s = _bcast(self.alpha(t), x), _bcast(self.sigma(t), x)
        if src == Prediction.X0:
            return p
        if src == Prediction.EPS:
            return (x - s * p) / a.clamp_min(1e-12)
        if src == Prediction.V:  # v = a eps - s x0
            return (a * x - s * p) / (a * a + s * s)
        da, ds = _bcast(self.d_alpha(t), x), _bcast(self.d_sigma(t), x)  # u = da x0 + ds eps
        return (ds * x - s * p) / (a * ds - s * da)

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor, dst: Prediction | str) -> Tensor:
        """A ``dst`` prediction from x0 and x_t, float64."""
        dst = Prediction(dst)
        t = torch.as_tensor(t, device=x_t.device)
        x0, x = x0.double(), x_t.double()
        if dst == Prediction.X0:
            return x0
        a, s = _bcast(self.alpha(t), x), _bcast(self.sigma(t), x)
        eps = (x - a * x0) / s.clamp_min(1e-12)
        if dst == Prediction.EPS:
            return eps
        if dst == Prediction.V:
            return a * eps - s * x0
        return _bcast(self.d_alpha(t), x) * x0 + _bcast(self.d_sigma(t), x) * eps

    def to_diffusers_config(self) -> dict:
        """A scheduler config that diffusers (and ``from_diffusers``) read back to this schedule."""
        if self.kind == "flow":
            return {"_class_name": "FlowMatchEulerDiscreteScheduler",
                    "num_train_timesteps": self.num_train_timesteps, "shift": self.shift}
        betas = 1 - self.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64),
                                                     self.alphas_cumprod[:-1]])
        return {"_class_name": "DDIMScheduler", "num_train_timesteps": self.num_train_timesteps,
                "trained_betas": betas.tolist(), "prediction_type": self.prediction.to_diffusers(),
                "timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False}


def _zero_terminal_snr(ab: Tensor) -> Tensor:
    """Rescale a table to zero terminal SNR (Lin et al. 2024, Alg. 1), as diffusers does."""
    sqrt_ab = ab.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab**2
