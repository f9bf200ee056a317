"""Test-only pieces for the trainer tests: a tiny deterministic two-phase algorithm and tiny roles.

``TinyAlgorithm`` has a critic phase (the critic regresses the teacher at noised real data) and a
generator phase (the generator's one-step samples, noised, are scored by the frozen critic against
the teacher, plus a pull towards the data), so gradients of the generator phase flow *through* the
critic without training it. With ``use_rng=False`` the loss draws no random numbers at all: the noise
comes from the batch, so two processes and one see exactly the same maths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stepdistill.algorithms.base import Algorithm, Batch, LossOutput
from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
from stepdistill.roles import Critic, Generator, Teacher
from stepdistill.schedules import NoiseSchedule, Prediction


class TinyAlgorithm(Algorithm):
    """Two phases, ``critic`` on most steps and ``generator`` every ``generator_every``-th step.

    Args:
        teacher, generator, critic: the roles.
        generator_every: the generator phase runs on steps k * generator_every - 1.
        nan_steps: steps whose loss is made NaN (to test the non-finite guard).
        nan_from: every step from this one on has a NaN loss (None: never).
        use_rng: draw the noise from torch's global RNG instead of deriving it from the batch.
    """

    phases = ("critic", "generator")

    def __init__(self, teacher: Teacher, generator: Generator, critic: Critic, seed: int = 0,
                 generator_every: int = 2, nan_steps: Sequence[int] = (), nan_from: int | None = None,
                 use_rng: bool = False) -> None:
        super().__init__(teacher, generator, seed)
        self.critic = critic
        self.generator_every = int(generator_every)
        self.nan_steps, self.nan_from, self.use_rng = set(nan_steps), nan_from, bool(use_rng)

    def phase(self, step: int) -> str:
        return "generator" if step % self.generator_every == self.generator_every - 1 else "critic"

    def trainable(self, phase: str) -> list[torch.nn.Module]:
        return [self.critic] if phase == "critic" else [self.generator]

    def _noise(self, x0: Tensor) -> Tensor:
        if self.use_rng:
            return torch.randn_like(x0)
        return torch.stack([x0[:, 1] * 0.8 - 0.3, -x0[:, 0] * 0.6 + 0.2], dim=1)

    def loss(self, phase: str, batch: Batch, step: int) -> LossOutput:
        x0 = batch.x0.to(self._dtype())
        eps = self._noise(x0)
        t = torch.full((x0.shape[0],), 0.6, dtype=torch.float64, device=x0.device)
        schedule = self.teacher.schedule
        if phase == "critic":
            x_t = schedule.add_noise(x0, eps, t)
            loss = (self.critic(x_t, t, batch.cond) - self.teacher.predict(x_t, t, batch.cond)).square().mean()
        else:
            x = self.generator(eps, torch.ones_like(t), batch.cond)
            x_t = schedule.add_noise(x, eps.flip(-1), t)
            score = (self.critic(x_t, t, batch.cond) - self.teacher.predict(x_t, t, batch.cond)).square().mean()
            loss = score + 0.1 * (x - x0).square().mean()
        if step in self.nan_steps or (self.nan_from is not None and step >= self.nan_from):
            loss = loss * float("nan")
        return LossOutput(loss, {"loss_x100": loss.detach() * 100})

    def _dtype(self) -> torch.dtype:
        return next(self.teacher.parameters()).dtype


def tiny_roles(hidden: int = 16, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """A tiny flow-matching ToyMLP teacher and its generator and critic copies."""
    torch.manual_seed(seed)
    backbone = torch.nn.Module.to(ToyMLP(num_classes=3, hidden=hidden, layers=1), dtype)
    teacher = Teacher(ToyDenoiser(backbone, NoiseSchedule.flow(), Prediction.FLOW))
    critic = Critic(teacher.denoiser)
    with torch.no_grad():  # a critic that differs from the teacher, so its loss starts above zero
        for p in critic.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return {"teacher": teacher, "generator": Generator(teacher.denoiser), "critic": critic}


def tiny_algorithm(dtype: torch.dtype = torch.float32, **kwargs) -> TinyAlgorithm:
    return TinyAlgorithm(**tiny_roles(dtype=dtype), **kwargs)
