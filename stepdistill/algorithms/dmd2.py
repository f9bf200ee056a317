"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024).

Two phases on a two time-scale schedule (Sec. 4.2): the critic (fake-score denoiser, plus the GAN
head when enabled) learns the generator's current distribution by denoising its samples; the
generator follows the distribution-matching gradient (teacher score vs critic score at noised
samples, Eq. 2 / DMD Eq. 7) plus an optional non-saturating GAN term (Sec. 4.3). Multi-step
generators train with backward simulation (Sec. 4.5): per step draw k (the same on every process),
run k generator steps without grad, train on step k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdistill.algorithms.base import Batch, LossOutput
from stepdistill.algorithms.common import CriticGeneratorAlgorithm, checked_gan_t_max
from stepdistill.errors import StepdistillError
from stepdistill.guidance import parse_scale
from stepdistill.losses import (
    distribution_matching_loss,
)
from stepdistill.roles import Critic, Generator, Teacher


class DMD2(CriticGeneratorAlgorithm):
    """DMD2 over any teacher / generator / critic.

    Args:
        teacher: frozen teacher; its CFG scale is ``guidance_scale`` (s_real; 1 = none).
        generator: the 1..K-step student.
        critic: the fake-score network (with a head when the GAN terms are on).
        guidance_scale: teacher CFG scale for the real score (None: the teacher's default; [lo, hi]:
            random-scale CFG, a scale drawn per sample at every teacher call).
        critic_updates_per_generator_update: the two time-scale ratio (5 in the paper; 10 for SD1.5).
        t_min, t_max: range of the noise level for the distribution-matching loss (0.02, 0.98).
        gan_generator_weight: weight of softplus(-D(fake)) in the generator loss (0 = off).
        gan_critic_weight: weight of the discriminator loss in the critic phase (0 = off).
        gan_t_max: the GAN terms noise real and generated samples at t in [0, gan_t_max] (1 = the
            paper's full range; lower keeps the discriminator where the two can still be told apart).
        seed: seed of the choices shared by all processes (backward-simulation k).
    """

    def __init__(self, teacher: Teacher, generator: Generator, critic: Critic, *,
                 guidance_scale: float | list[float] | None = None, critic_updates_per_generator_update: int = 5,
                 t_min: float = 0.02, t_max: float = 0.98, gan_generator_weight: float = 0.0,
                 gan_critic_weight: float = 0.0, gan_t_max: float = 1.0, seed: int = 0) -> None:
        super().__init__(teacher, generator, seed)
        self.critic = critic
        self.gan_t_max = checked_gan_t_max(gan_t_max)
        self.guidance_scale = teacher.guidance_scale if guidance_scale is None else \
            parse_scale(guidance_scale, "algorithm.guidance_scale")  # a range: random-scale CFG
        self.ratio = int(critic_updates_per_generator_update)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.gan_generator_weight = float(gan_generator_weight)
        self.gan_critic_weight = float(gan_critic_weight)
        if self.ratio < 1:
            raise StepdistillError("algorithm.critic_updates_per_generator_update must be >= 1")
        if (self.gan_generator_weight > 0 or self.gan_critic_weight > 0) and critic.head is None:
            raise StepdistillError("the GAN terms need a discriminator head: set critic.head=true "
                                   "(or algorithm.gan_generator_weight=0 and gan_critic_weight=0)")

    # ----------------------------------------------------------------- generator phase
    def _generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x = self.student_sample(batch.cond, step, grad=True)
        t, x_t, x0_real = self._teacher_at_noised(x, batch.cond, self.t_min, self.t_max, self.guidance_scale)
        with torch.no_grad():
            x0_fake = self.critic(x_t, t, batch.cond)
        dm = distribution_matching_loss(x, x0_real, x0_fake).mean()
        logs: dict[str, float | Tensor] = {"dm_loss": dm.detach()}
        loss = dm + self._gan_generator_term(x, batch.cond, self.gan_generator_weight, logs)
        return LossOutput(loss, logs)

    # ----------------------------------------------------------------- critic phase
    def _critic_loss(self, batch: Batch, step: int) -> LossOutput:
        return self._denoising_and_gan_critic_loss(batch, step, self.gan_critic_weight)
