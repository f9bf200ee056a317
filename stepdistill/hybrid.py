"""Hybrid sampling ("diversity distillation"): the teacher runs the first step(s), the student the rest.

One-step students lose sample diversity: the layout of a sample is decided in the first, noisiest
steps, which the student collapses onto its few favourite modes. Hybrid sampling lets the teacher
(with its CFG scale) take the first ``k`` deterministic DDIM / Euler steps from pure noise (t = 1)
down to a switch time, and hands that genuine x_t to the student, which runs its own steps from there.

Where the switch happens:

- a student with ``t_max < 1`` (the digits DMD2 students start at 0.7, taking standard normal noise
  as their state there): at the start of its own grid (``generator.grid(steps)[0]``). The teacher takes
  ``k`` steps evenly spaced in t from 1 down to it (VP: snapped to the integer timestep table); the
  student's grid is unchanged.
- a student with ``t_max = 1``: at the time the teacher reaches after the first ``k`` steps of its own
  ``teacher_grid_steps``-step grid (``NoiseSchedule.timesteps``); the student's K steps are re-spaced
  from there (``NoiseSchedule.timesteps(K, t_switch)``, as ``Generator.grid`` spaces them from
  ``t_max``). Only generators that keep the base ``Generator.grid`` / ``sample`` can be re-spaced.

``k = 0`` is exactly the student's own sampling (``Generator.sample``, same noise, same RNG draws).
RNG order per batch (``sample_hybrid``): the initial noise from ``rng``, then the student's re-noising
draws from the same ``rng``, as ``stepdistill.pipelines.few_step.generate`` (the teacher's steps draw
nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.roles import Generator, Teacher
from stepdistill.sampling import ode_sample, renoise_sample
from stepdistill.schedules import NoiseSchedule


@dataclass(frozen=True)
class HybridPlan:
    """Where each model steps.

    Attributes:
        teacher_grid: [k + 1] descending times of the teacher's k steps, from 1 to ``switch_time``
            (just [t_start] for k = 0: the teacher takes no step).
        student_grid: [K] start times of the student's steps; the first is ``switch_time``.
        respaced: whether ``student_grid`` differs from the generator's own ``grid(steps)``.
    """

    teacher_grid: Tensor
    student_grid: Tensor
    respaced: bool

    @property
    def teacher_steps(self) -> int:
        return len(self.teacher_grid) - 1

    @property
    def switch_time(self) -> float:
        return float(self.student_grid[0])


def check_teacher_steps(teacher_steps: int, teacher_grid_steps: int) -> int:
    """``teacher_steps`` as an int in 0..teacher_grid_steps - 1, or a one-line ``StepdistillError``."""
    if isinstance(teacher_steps, bool) or int(teacher_steps) != teacher_steps:
        raise StepdistillError(f"hybrid_teacher_steps must be an integer, got {teacher_steps!r}")
    k = int(teacher_steps)
    if not 0 <= k < int(teacher_grid_steps):
        raise StepdistillError(f"hybrid_teacher_steps={k} must be in 0..{int(teacher_grid_steps) - 1} "
                               f"(the teacher's {teacher_grid_steps}-step grid leaves the student at least one "
                               "step); pass a smaller k")
    return k


def hybrid_plan(generator: Generator, teacher_steps: int, *, steps: int | None = None,
                teacher_grid_steps: int = 50) -> HybridPlan:
    """The teacher's and the student's grids for ``teacher_steps`` = k teacher steps then K = ``steps``
    (default ``generator.steps``) student steps (see the module docstring for the switch time)."""
    k = check_teacher_steps(teacher_steps, teacher_grid_steps)
    schedule = generator.schedule
    own_grid = generator.grid(steps)
    if generator.t_max < 1.0:  # the student starts below pure noise: the teacher brings x there
        teacher_grid = _even_grid(schedule, 1.0, float(own_grid[0]), k)
        return HybridPlan(teacher_grid, own_grid, respaced=False)
    if k == 0:
        return HybridPlan(own_grid[:1], own_grid, respaced=False)
    _check_respaceable(generator)
    teacher_grid = schedule.timesteps(int(teacher_grid_steps))[:k + 1]
    n = generator.steps if steps is None else int(steps)
    switch = float(teacher_grid[-1])
    try:
        student_grid = schedule.timesteps(n, switch)[:-1]
    except ValueError as err:
        raise StepdistillError(f"the student's {n} steps do not fit below the switch time {switch:.4f} ({err}); "
                               "pass fewer steps or a smaller hybrid_teacher_steps") from None
    return HybridPlan(teacher_grid, student_grid, respaced=True)


def _even_grid(schedule: NoiseSchedule, start: float, stop: float, k: int) -> Tensor:
    """k + 1 times evenly spaced from ``start`` to ``stop`` (VP: snapped to the integer timestep table)."""
    grid = torch.linspace(start, stop, k + 1, dtype=torch.float64)
    if schedule.kind == "vp":
        grid = schedule.from_model_time(torch.round(schedule.to_model_time(grid)))
    if k > 0 and not bool((grid[1:] < grid[:-1]).all()):
        raise StepdistillError(f"{k} teacher steps do not fit between t={start} and t={stop:.4f} on the "
                               "timestep table; pass a smaller hybrid_teacher_steps")
    return grid


def _check_respaceable(generator: Generator) -> None:
    cls = type(generator)
    if generator.timesteps is not None:
        raise StepdistillError(f"hybrid sampling cannot re-space generator.timesteps={generator.timesteps} (a "
                               "student that starts at t_max=1 with its own grid); use hybrid_teacher_steps=0")
    if cls.grid is not Generator.grid or cls.sample is not Generator.sample:
        raise StepdistillError(f"hybrid sampling cannot re-space the grid of a {cls.__name__} that starts at "
                               "t_max=1 (it has its own step grid); use hybrid_teacher_steps=0, or a student "
                               "with generator.t_max < 1")


@torch.no_grad()
def teacher_steps_to_switch(teacher: Teacher, noise: Tensor, cond: Conditioning, teacher_grid: Tensor) -> Tensor:
    """x at ``teacher_grid[-1]``: the teacher's DDIM / Euler steps (its default CFG scale) along
    ``teacher_grid`` from ``noise``, the state at ``teacher_grid[0]``; ``noise`` itself for one time."""
    if len(teacher_grid) < 2:
        return noise
    return ode_sample(lambda x, t: teacher.predict(x, t, cond), teacher.schedule, noise,
                      len(teacher_grid) - 1, grid=teacher_grid)


@torch.no_grad()
def hybrid_sample(teacher: Teacher, generator: Generator, noise: Tensor, cond: Conditioning,
                  teacher_steps: int, *, steps: int | None = None, teacher_grid_steps: int = 50,
                  generator_rng: torch.Generator | None = None) -> Tensor:
    """x0 [B, ...]: ``teacher_steps`` teacher steps from ``noise`` [B, ...] (pure noise at t = 1), then the
    student's steps from the switch time.

    Args:
        teacher: the base model; runs with its default guidance scale.
        generator: the distilled student.
        noise: [B, ...] standard normal noise.
        cond: B conditions.
        teacher_steps: k >= 0 teacher steps (0: exactly ``generator.sample(noise, cond, steps)``).
        steps: the student's K (default ``generator.steps``).
        teacher_grid_steps: the teacher grid the first k steps are taken from (students with t_max = 1).
        generator_rng: CPU ``torch.Generator`` for the student's re-noising draws (as ``Generator.sample``).
    Returns:
        [B, ...] the samples.
    """
    plan = hybrid_plan(generator, teacher_steps, steps=steps, teacher_grid_steps=teacher_grid_steps)
    x_switch = teacher_steps_to_switch(teacher, noise, cond, plan.teacher_grid)
    if not plan.respaced:
        return generator.sample(x_switch, cond, steps, generator=generator_rng)
    return renoise_sample(lambda x, t: generator(x, t, cond), generator.schedule, x_switch, plan.student_grid,
                          generator=generator_rng)


@torch.no_grad()
def sample_hybrid(teacher: Teacher, generator: Generator, cond: Conditioning, num: int, teacher_steps: int, *,
                  steps: int | None = None, seed: int = 0, batch_size: int | None = None,
                  teacher_grid_steps: int = 50) -> Tensor:
    """``num`` hybrid samples for ``cond`` (B == num, or 1 repeated) from ``seed``, in batches.

    Draws as ``stepdistill.pipelines.sample_student`` does (one CPU ``torch.Generator`` for all batches:
    each batch's noise, then its re-noising draws), so ``teacher_steps=0`` returns its samples exactly.
    """
    check_teacher_steps(teacher_steps, teacher_grid_steps)
    if len(cond) != num:
        if len(cond) != 1:
            raise StepdistillError(f"got {len(cond)} conditions for {num} samples; pass 1 or {num}")
        cond = cond.repeat(num)
    param = next(generator.parameters())
    rng = torch.Generator().manual_seed(int(seed))
    size = num if not batch_size else int(batch_size)
    chunks = []
    for i in range(0, num, size):
        part = cond.index(slice(i, i + size)).to(param.device)
        noise = torch.randn((len(part), *generator.denoiser.sample_shape), generator=rng, device="cpu")
        chunks.append(hybrid_sample(teacher, generator, noise.to(param.device, param.dtype), part, teacher_steps,
                                    steps=steps, teacher_grid_steps=teacher_grid_steps, generator_rng=rng))
    return torch.cat(chunks)


def run_teacher(config) -> Teacher:
    """The teacher of a run config (``teacher.path``) at the scale its evaluation uses:
    ``algorithm.guidance_scale`` when set (the scale the student was distilled against), else
    ``teacher.guidance_scale`` (default 1)."""
    node = config.get("teacher") if config is not None else None
    path = node.get("path") if node is not None else None
    if not path:
        raise StepdistillError("the run's config.yaml has no teacher.path: hybrid sampling needs the teacher; "
                               "sample without hybrid_teacher_steps")
    algorithm = config.get("algorithm") or {}
    scale = algorithm.get("guidance_scale")
    scale = node.get("guidance_scale", 1.0) if scale is None else scale
    return Teacher(load_denoiser(str(path)), 1.0 if scale is None else scale)  # a range: random-scale CFG
