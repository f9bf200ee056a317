"""The diffusers scheduler of an exported few-step generator, and its timestep maths.

``few_step_scheduler`` is the scheduler whose ``step`` is the generator's re-noising step (why
``LCMScheduler`` reproduces ``stepdistill.sampling.renoise_sample``: ``stepdistill.pipelines.export``'s
docstring); ``lcm_timesteps`` is LCM's default K-step selection and ``generator_timesteps`` /
``model_timesteps`` a generator's own grid, which the export compares.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

from stepdistill.errors import StepdistillError
from stepdistill.roles import step_grid
from stepdistill.schedules import NoiseSchedule, Prediction

#: LCM's boundary-condition time scaling: large enough that c_skip = 0 and c_out = 1 in float32
TIMESTEP_SCALING = 1e6
#: the guidance_scale to pass to the exported SD / SDXL pipeline (no classifier-free guidance)
GUIDANCE_SCALE = 1.0


def few_step_scheduler(schedule: NoiseSchedule, base_config: dict | None = None,
                       prediction: Prediction | str | None = None, t_max: float = 1.0, *,
                       timestep_scaling: float | None = None, original_steps: int | None = None) -> Any:
    """The diffusers scheduler whose ``step`` is the generator's re-noising step (module docstring).

    VP: ``LCMScheduler`` on the teacher's table (``base_config``'s beta fields, else the schedule's
    own betas), ``original_inference_steps`` = ``lcm_original_steps`` (N for a generator starting
    at t_max = 1), ``timestep_scaling = 1e6``; a consistency student passes its own boundary scaling
    and solver grid (``timestep_scaling = 10``, ``original_steps = 50`` for LCM). Flow: the teacher's
    ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling=True`` (x0 = x - sigma v, then
    re-noised to the next sigma with fresh noise).
    """
    prediction = Prediction(prediction or schedule.prediction)
    if schedule.kind == "flow":
        base = _fit(FlowMatchEulerDiscreteScheduler, base_config or schedule.to_diffusers_config())
        return FlowMatchEulerDiscreteScheduler.from_config({**base, "shift": schedule.shift,
                                                            "stochastic_sampling": True})
    if prediction == Prediction.FLOW:
        raise StepdistillError("a flow-prediction backbone needs a flow schedule")
    n = schedule.num_train_timesteps
    # steps_offset is unused by LCM; 1 keeps the SD pipelines from warning and rewriting the config
    overrides = dict(num_train_timesteps=n,
                     original_inference_steps=original_steps or lcm_original_steps(schedule, t_max),
                     timestep_scaling=timestep_scaling or TIMESTEP_SCALING,
                     prediction_type=prediction.to_diffusers(), clip_sample=False, thresholding=False,
                     set_alpha_to_one=True, steps_offset=1, timestep_spacing="trailing")
    scheduler = LCMScheduler.from_config({**_fit(LCMScheduler, base_config or {}), **overrides})
    if base_config is None or not _same_table(scheduler, schedule):
        betas = schedule.to_diffusers_config()["trained_betas"]
        scheduler = LCMScheduler.from_config({**overrides, "trained_betas": betas,
                                              "rescale_betas_zero_snr": False})
    return scheduler


def lcm_original_steps(schedule: NoiseSchedule, t_max: float = 1.0) -> int:
    """LCM's ``original_inference_steps`` M whose default selection starts at the generator's first
    timestep T0 = round(t_max (N - 1)): M = T0 + 1 when N // M == 1 (LCM's training grid is then
    0..M-1), else N (t_max <= 0.5: pass the grid as ``timesteps=``)."""
    n = schedule.num_train_timesteps
    top = round(t_max * (n - 1)) + 1
    return top if n // top == 1 else n


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int | None = None) -> list[int]:
    """The timesteps ``LCMScheduler(original_inference_steps=M).set_timesteps(K)`` selects (M = N by default)."""
    n = int(num_train_timesteps)
    m = n if original_steps is None else int(original_steps)
    k = n // m
    return [(m - (i * m) // steps) * k - 1 for i in range(steps)]


def generator_timesteps(schedule: NoiseSchedule, steps: int, t_max: float = 1.0,
                        timesteps: list[float] | None = None) -> list[int] | list[float]:
    """The backbone timesteps of a ``Generator``'s K-step grid (``Generator.grid``: its own
    ``timesteps`` for their K, else evenly spaced from ``t_max``)."""
    return model_timesteps(schedule, step_grid(schedule, steps, t_max, timesteps))


def model_timesteps(schedule: NoiseSchedule, grid: torch.Tensor) -> list[int] | list[float]:
    """The backbone timesteps of a grid of times: integers for VP tables (when the grid is on the table),
    floats otherwise."""
    values = [float(v) for v in schedule.to_model_time(grid)]
    if schedule.kind == "vp" and all(abs(v - round(v)) < 1e-6 for v in values):
        return [int(round(v)) for v in values]
    return [round(v, 3) for v in values]


def _same_table(scheduler: Any, schedule: NoiseSchedule) -> bool:
    ab = scheduler.alphas_cumprod.double()
    ref = schedule.alphas_cumprod
    return ab.shape == ref.shape and bool(((ab - ref).abs() <= 1e-6 * ref.clamp_min(1e-6)).all())


def _fit(cls: type, config: dict) -> dict:
    """``config`` restricted to ``cls.__init__``'s parameters (no unexpected-key warnings)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(config).items() if k in params}
