"""Samplers on the continuous time grid of a ``NoiseSchedule``.

The teacher ODE sampler is DDIM (eta = 0) for VP schedules and Euler for flow schedules: both are
``x_next = alpha(t_next) x0_hat + sigma(t_next) eps_hat``. A multi-step generator instead re-noises
its x0 with fresh noise (DMD2, few-step SiD, consistency models). Both start from the noise
itself at the grid's first time, as diffusers' pipelines do (``init_noise_sigma = 1``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from stepdistill.schedules import NoiseSchedule, Prediction

PredictX0 = Callable[[Tensor, Tensor], Tensor]  # (x_t [B, ...], t [B]) -> x0 [B, ...]


def ode_sample(predict_x0: PredictX0, schedule: NoiseSchedule, noise: Tensor, steps: int,
               *, grid: Tensor | None = None, progress: bool = False) -> Tensor:
    """Deterministic DDIM / Euler sampling from ``noise`` at the grid's first time down to 0.

    Args:
        predict_x0: the (possibly guided) x0 predictor.
        noise: [B, ...] standard normal noise.
        steps: number of model evaluations per branch.
        grid: optional descending times ([steps + 1], last 0); ``schedule.timesteps(steps)`` by default.
    Returns:
        [B, ...] the sample.
    """
    grid = schedule.timesteps(steps) if grid is None else grid
    x = noise
    iterator = range(len(grid) - 1)
    if progress:
        iterator = tqdm(iterator, desc="sampling", leave=False)
    for i in iterator:
        t, t_next = grid[i], grid[i + 1]
        tb = t.expand(x.shape[0]).to(x.device)
        x0 = predict_x0(x, tb)
        if float(t_next) <= 0:
            return x0
        eps = schedule.from_x0(x0, x, tb, Prediction.EPS)
        tn = t_next.expand(x.shape[0]).to(x.device)
        x = schedule.add_noise(x0.double(), eps, tn).to(noise.dtype)
    return x


def renoise_sample(predict_x0: PredictX0, schedule: NoiseSchedule, noise: Tensor, grid: Tensor,
                   *, generator: torch.Generator | None = None) -> Tensor:
    """Few-step generator sampling: predict x0, re-noise it with fresh noise to the next time.

    Args:
        grid: descending start times of each step ([K]); the first is where ``noise`` starts.
    """
    x = noise
    for i in range(len(grid)):
        x0 = predict_x0(x, grid[i].expand(x.shape[0]).to(x.device))
        if i + 1 == len(grid):
            return x0
        fresh = torch.randn(x.shape, generator=generator, device="cpu").to(x) if generator is not None \
            else torch.randn_like(x)
        x = schedule.add_noise(x0, fresh, grid[i + 1].expand(x.shape[0]).to(x.device))
    return x


@torch.no_grad()
def simulate_to_step(predict_x0: PredictX0, schedule: NoiseSchedule, noise: Tensor, grid: Tensor,
                     k: int) -> Tensor:
    """Backward simulation (DMD2 Sec. 4.5): the state at the start of step ``k`` of a few-step
    generator, reached from ``noise`` by running steps 0..k-1 without grad and re-noising."""
    x = noise
    for i in range(k):
        x0 = predict_x0(x, grid[i].expand(x.shape[0]).to(x.device))
        x = schedule.add_noise(x0, torch.randn_like(x0), grid[i + 1].expand(x.shape[0]).to(x.device))
    return x


def ddim_jump(schedule: NoiseSchedule, x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The DDIM (VP) / Euler (flow) step from ``x_t`` at ``t`` to ``t_next`` [B] given the predicted
    ``x0``: ``alpha(t_next) x0 + sigma(t_next) eps_hat``, with ``x0`` itself where ``t_next == 0``
    (the samplers' last step), in float64, returned in ``x_t``'s dtype."""
    eps = schedule.from_x0(x0, x_t, t, Prediction.EPS)
    x_next = schedule.add_noise(x0.double(), eps, t_next)
    done = (t_next <= 0).reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.device)
    return torch.where(done, x0.double(), x_next).to(x_t.dtype)


def ddim_invert(schedule: NoiseSchedule, x_next: Tensor, x_t: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """The x0 whose ``ddim_jump`` from (``x_t``, ``t``) lands on ``x_next`` at ``t_next`` [B]
    (multistep CD's inverse DDIM): ``x_next = A x0 + B x_t`` with ``B = sigma(t_next) / sigma(t)`` and
    ``A = alpha(t_next) - B alpha(t)``; ``x_next`` itself where ``t_next == 0``."""
    shape = (-1, *([1] * (x_t.dim() - 1)))
    t, t_next = t.to(x_t.device), t_next.to(x_t.device)
    b = (schedule.sigma(t_next) / schedule.sigma(t)).reshape(shape)
    a = schedule.alpha(t_next).reshape(shape) - b * schedule.alpha(t).reshape(shape)
    x0 = (x_next.double() - b * x_t.double()) / a
    done = (t_next <= 0).reshape(shape)
    return torch.where(done, x_next.double(), x0).to(x_t.dtype)
