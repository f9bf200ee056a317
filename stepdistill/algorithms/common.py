"""Pieces several algorithms share (without inheriting from one another)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.algorithms.base import Algorithm, Batch, LossOutput, unwrap
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.losses import denoising_loss, gan_discriminator_loss, gan_generator_loss
from stepdistill.sampling import simulate_to_step
from stepdistill.schedules import NoiseSchedule


def student_sample(generator: nn.Module, cond: Conditioning, shared: torch.Generator, *, grad: bool) -> Tensor:
    """Generator output x0 [B, ...] for ``cond``. K-step generators train with backward simulation
    (DMD2 Sec. 4.5; few-step SiD): draw k in 0..K-1 from ``shared`` (the same on every process), run
    k generator steps without grad from fresh noise, and return step k's output (with grad if asked);
    on ``Generator.training_grid()`` (``generator.training_timesteps``, else the sampling grid).

    Args:
        generator: the (possibly DDP-wrapped) ``Generator``; the graded call goes through the wrapper.
        shared: a generator seeded identically on every process (``Algorithm.shared_generator(step)``).
    """
    gen = unwrap(generator)
    grid = gen.training_grid()
    k = int(torch.randint(len(grid), (1,), generator=shared)) if len(grid) > 1 else 0
    device = next(gen.parameters()).device
    noise = torch.randn(len(cond), *gen.denoiser.sample_shape, device=device)
    x_k = simulate_to_step(lambda x, t: gen(x, t, cond), gen.schedule, noise, grid, k)
    t_k = grid[k].expand(len(cond)).to(device)
    with torch.set_grad_enabled(grad):
        return generator(x_k, t_k, cond)


def noised(schedule: NoiseSchedule, x: Tensor, cond: Conditioning,
           t_max: float = 1.0) -> tuple[Tensor, Tensor, Conditioning]:
    """(x_t, t, cond) at a fresh noise level t in [0, t_max] (the diffusion GAN's inputs)."""
    t = schedule.sample_time(len(x), device=x.device, t_max=t_max)
    return schedule.add_noise(x, torch.randn_like(x), t), t, cond


def checked_gan_t_max(value: float) -> float:
    """``algorithm.gan_t_max`` (the top of the diffusion GAN's noise range) as a float in (0, 1]."""
    if not 0.0 < float(value) <= 1.0:
        raise StepdistillError(f"algorithm.gan_t_max must be in (0, 1], got {value}")
    return float(value)


class CriticGeneratorAlgorithm(Algorithm):
    """The two-phase skeleton DMD2, f-distill and SiD share (none inherits another): a critic phase
    and a generator phase on DMD2's two time-scale rule, ``ratio`` critic steps then one generator
    step (Sec. 4.2; ratio 1 is SiD's 1:1 alternation). Subclasses set ``self.critic`` and
    ``self.ratio`` and implement ``_critic_loss`` and ``_generator_loss``."""

    phases = ("critic", "generator")
    critic: nn.Module
    ratio: int
    #: the diffusion GAN's noise levels are drawn in [0, gan_t_max] (1.0: the full range, as DMD2)
    gan_t_max: float = 1.0

    def phase(self, step: int) -> str:
        return "generator" if step % (self.ratio + 1) == self.ratio else "critic"

    def trainable(self, phase: str) -> list[nn.Module]:
        return {"critic": [self.critic], "generator": [self.generator]}[phase]

    def loss(self, phase: str, batch: Batch, step: int) -> LossOutput:
        if phase == "generator":
            return self._generator_loss(batch, step)
        if phase == "critic":
            return self._critic_loss(batch, step)
        raise ValueError(f"unknown phase {phase!r}; {type(self).__name__} phases: {self.phases}")

    def _generator_loss(self, batch: Batch, step: int) -> LossOutput:
        raise NotImplementedError

    def _critic_loss(self, batch: Batch, step: int) -> LossOutput:
        raise NotImplementedError

    def student_sample(self, cond: Conditioning, step: int, *, grad: bool) -> Tensor:
        """Generator output x0 [B, ...] for ``cond``; K-step students use backward simulation."""
        return student_sample(self.generator, cond, self.shared_generator(step), grad=grad)

    def _noised(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor, Conditioning]:
        return noised(self.teacher.schedule, x, cond, self.gan_t_max)

    @torch.no_grad()
    def _teacher_at_noised(self, x: Tensor, cond: Conditioning, t_min: float, t_max: float,
                           guidance_scale: float | tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
        """(t, x_t, x0_real): ``x`` (detached) noised at t in [t_min, t_max] and the teacher's guided x0
        there: where the distribution-matching term of DMD2 / f-distill compares the two scores."""
        schedule = self.teacher.schedule
        t = schedule.sample_time(len(x), device=x.device, t_min=t_min, t_max=t_max)
        x_t = schedule.add_noise(x.detach(), torch.randn_like(x), t)
        return t, x_t, self.teacher.predict(x_t, t, cond, guidance_scale=guidance_scale)

    def _gan_generator_term(self, x: Tensor, cond: Conditioning, weight: float, logs: dict) -> Tensor:
        """``weight * softplus(-D(x_t))`` at a fresh noise level (DMD2 Sec. 4.3; 0 when ``weight`` is 0),
        logged as ``gan_generator_loss``."""
        if weight <= 0:
            return x.new_zeros(())
        _, logits = self.critic(*self._noised(x, cond), logits=True)
        gan = gan_generator_loss(logits).mean()
        logs["gan_generator_loss"] = gan.detach()
        return weight * gan

    def _denoising_and_gan_critic_loss(self, batch: Batch, step: int, gan_weight: float) -> LossOutput:
        """The critic phase of DMD2 and f-distill: the critic's denoising loss on generator samples (its
        native parameterisation), plus ``gan_weight`` x the discriminator loss, real data vs those samples,
        each noised at its own level in [0, gan_t_max] (DMD2 Eq. 6; off when ``gan_weight`` is 0)."""
        x = self.student_sample(batch.cond, step, grad=False)
        schedule = self.teacher.schedule
        eps = torch.randn_like(x)
        t = schedule.sample_time(len(x), device=x.device)
        native = unwrap(self.critic).denoiser.prediction
        want_logits = gan_weight > 0
        shared = want_logits and self.gan_t_max >= 1.0  # same t range for both terms: one forward
        out = self.critic(schedule.add_noise(x, eps, t), t, batch.cond, out=native, logits=shared)
        pred, logits_fake = out if shared else (out, None)
        if want_logits and not shared:  # the denoising t spans the full range, the GAN's stops at gan_t_max
            _, logits_fake = self.critic(*self._noised(x, batch.cond), logits=True)
        denoise = denoising_loss(pred, schedule.target(x, eps, t, native)).mean()
        logs: dict[str, float | Tensor] = {"critic_denoising_loss": denoise.detach()}
        if not want_logits:
            return LossOutput(denoise, logs)
        if batch.x0 is None:
            raise StepdistillError("the GAN critic term needs real data: this task gives none")
        _, logits_real = self.critic(*self._noised(batch.x0.to(x), batch.cond), logits=True)
        gan = gan_discriminator_loss(logits_real, logits_fake).mean()
        logs.update(gan_critic_loss=gan.detach(), logit_real=logits_real.mean().detach(),
                    logit_fake=logits_fake.mean().detach())
        return LossOutput(denoise + gan_weight * gan, logs)
