"""Consistency distillation: LCM, multistep CD and trajectory-segmented CD (one module).

- LCM (Luo et al. 2023, Alg. 1 / Eq. 9): noise a real sample x0 to a solver point t_n (M-point grid,
  skip 1 on it, i.e. k = N / M table steps); the teacher makes one guided DDIM (VP) / Euler (flow)
  step to t_{n-1} at a CFG scale s drawn from [s_min, s_max] that the student also receives (its
  guidance embedding); the target is the target network's output at t_{n-1} (an EMA of the student,
  decay 0.95, or the online student without grad), and the student matches it at t_n in x0 space
  with a pseudo-Huber or L2 distance. The student's boundary form is ``ConsistencyGenerator``'s.
- Multistep CD (Heek et al. 2024, Alg. 1-2): the grid is cut into S segments; inside a segment the
  consistency target is the state at the segment's lower edge, reached by a DDIM jump from the
  target's x0 at t_{n-1}, and turned back into an x0 target by inverting the student's own jump
  from t_n (``ddim_invert``). S = 1 is LCM; sampling takes S jumps (``sampler="ode"``).
- Trajectory-segmented CD (Hyper-SD, Ren et al. 2024, Sec. 3.1): a schedule of segment counts
  (8 -> 4 -> 2 -> 1) run as consecutive stages of one job, each from the previous stage's weights;
  the target network restarts from the student at each stage. Its optional adversarial term reuses
  DMD2's discriminator (a ``Critic`` with a head; real vs student x0, both noised at a fresh level;
  DMD2 Eq. 5-6): a critic phase then a generator phase, 1:1, when ``critic`` is given.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.algorithms.base import Algorithm, Batch, LossOutput, unwrap
from stepdistill.algorithms.common import checked_gan_t_max, noised
from stepdistill.ema import EMA
from stepdistill.errors import StepdistillError
from stepdistill.lora import LoraEMA, has_lora
from stepdistill.losses import consistency_loss, gan_discriminator_loss, gan_generator_loss
from stepdistill.roles import ConsistencyGenerator, Critic, Teacher
from stepdistill.sampling import ddim_invert, ddim_jump
from stepdistill.schedules import NoiseSchedule


class ConsistencyDistillation(Algorithm):
    """LCM / multistep CD / TSCD over any teacher and a ``ConsistencyGenerator``.

    Args:
        teacher: the frozen teacher (its solver makes the one-step ODE targets).
        generator: the student (its ``solver_steps`` is the grid M; its boundary form and guidance
            embedding are part of it).
        segments: S, or a list of segment counts run as stages (TSCD, with ``stage_steps``).
        stage_steps: optimizer steps of each stage but the last (which runs to the end).
        guidance_scale: the teacher's CFG scale when no range is given (None: the teacher's).
        guidance_min, guidance_max: the range s is drawn from per sample (LCM: w in [2, 14], i.e.
            s = w + 1 in [3, 15]); a range needs a guidance-embedded student.
        target_decay: EMA decay of the target network (LCM: 0.95); 0 uses the online student
            without grad (no extra copy). A LoRA student's target is an EMA of its adapters only.
        loss: "huber" (LCM's pseudo-Huber per element, c = ``huber_c``), "huber_ict" (iCT's pseudo-Huber
            on each sample's vector, c = 0.00054 sqrt(d)) or "l2"; ``stepdistill.losses.consistency_loss``.
        weighting: per-sample loss weight over the solver grid: "uniform" (LCM, CM) or "ict" (iCT's
            1 / (sigma(t_n) - sigma(t_{n-1})), sigma = the schedule's sigma / alpha, normalised to mean 1
            over the grid: more weight on the low-noise steps; ``consistency_weights``).
        weighting_power: the exponent on iCT's weights before normalising (1: iCT's; 2 leans further
            towards the low-noise steps).
        critic: a ``Critic`` with a discriminator head for the adversarial term (None: off).
        gan_generator_weight: weight of softplus(-D(student x0)) in the generator loss.
        gan_t_max: real and student samples reach the discriminator noised at t in [0, gan_t_max].
        seed: seed of the choices shared by all processes (none so far; kept for the interface).
    """

    phases = ("generator",)

    def __init__(self, teacher: Teacher, generator: ConsistencyGenerator, *, segments: int | list[int] = 1,
                 stage_steps: list[int] | None = None, guidance_scale: float | None = None,
                 guidance_min: float | None = None, guidance_max: float | None = None,
                 target_decay: float = 0.95, loss: str = "huber", huber_c: float = 1e-3,
                 weighting: str = "uniform", weighting_power: float = 1.0, critic: Critic | None = None,
                 gan_generator_weight: float = 0.1, gan_t_max: float = 1.0, seed: int = 0) -> None:
        super().__init__(teacher, generator, seed)
        self.gan_t_max = checked_gan_t_max(gan_t_max)
        if critic is not None and critic.head is None:
            raise StepdistillError("the adversarial term needs a discriminator head: set critic.head=true")
        self.critic = critic
        self.gan_generator_weight = float(gan_generator_weight)
        self.phases = ("critic", "generator") if critic is not None else ("generator",)
        if not isinstance(unwrap(generator), ConsistencyGenerator):
            raise StepdistillError("consistency distillation needs generator._target_="
                                   "stepdistill.roles.ConsistencyGenerator (its boundary form and solver grid)")
        self.segments = [int(segments)] if isinstance(segments, int) else [int(s) for s in segments]
        self.stage_steps = [int(s) for s in (stage_steps or [])]
        self._check_segments(unwrap(generator).solver_steps)
        scale = teacher.guidance_scale if guidance_scale is None else float(guidance_scale)
        self.guidance_range = (float(scale if guidance_min is None else guidance_min),
                               float(scale if guidance_max is None else guidance_max))
        if self.guidance_range[0] != self.guidance_range[1] and not unwrap(generator).guided:
            raise StepdistillError("a guidance range (algorithm.guidance_min < guidance_max) needs a student that "
                                   "takes the scale: set generator.guidance_embedding_dim (e.g. 256)")
        if loss not in ("huber", "huber_ict", "l2"):
            raise StepdistillError(f"algorithm.loss must be 'huber', 'huber_ict' or 'l2', got {loss!r}")
        self.loss_kind, self.huber_c = loss, float(huber_c)
        if weighting not in ("uniform", "ict"):
            raise StepdistillError(f"algorithm.weighting must be 'uniform' or 'ict', got {weighting!r}")
        self.weighting = weighting
        if not float(weighting_power) > 0:
            raise StepdistillError(f"algorithm.weighting_power must be > 0, got {weighting_power!r}")
        self.weighting_power = float(weighting_power)
        self.target_decay = float(target_decay)
        self.target = _target_network(unwrap(generator)) if self.target_decay > 0 else None

    def _check_segments(self, solver_steps: int) -> None:
        if len(self.stage_steps) != len(self.segments) - 1:
            raise StepdistillError(f"algorithm.stage_steps needs {len(self.segments) - 1} entries (one per stage but "
                                   f"the last) for segments={self.segments}, got {self.stage_steps}")
        for s in self.segments:
            if s < 1 or solver_steps % s:
                raise StepdistillError(f"algorithm.segments={s} must divide generator.solver_steps={solver_steps}")

    def trainable(self, phase: str) -> list[nn.Module]:
        return [self.critic] if phase == "critic" else [self.generator]

    def train(self, mode: bool = True) -> ConsistencyDistillation:
        super().train(mode)
        if self.target is not None:
            self.target.train(False)
        return self

    def stage(self, step: int) -> int:
        """The TSCD stage optimizer step ``step`` belongs to (0 without stages)."""
        ends = torch.tensor(self.stage_steps).cumsum(0).tolist()
        return sum(step >= e for e in ends)

    @torch.no_grad()
    def after_step(self, phase: str, step: int) -> None:
        """EMA update of the target network (LCM Alg. 1, last line); a new TSCD stage restarts it."""
        if self.target is None or phase != "generator":
            return
        new_stage = self.stage(step + 1) != self.stage(step)
        self.target.update(unwrap(self.generator), 0.0 if new_stage else self.target_decay)

    # ----------------------------------------------------------------- the loss
    def loss(self, phase: str, batch: Batch, step: int) -> LossOutput:
        if batch.x0 is None:
            raise StepdistillError("consistency distillation noises real samples: this task gives none "
                                   "(use a dataset task, or image_captions data for text teachers)")
        gen = unwrap(self.generator)
        schedule, x0 = self.teacher.schedule, batch.x0
        t, t_prev, t_edge = self._times(gen, len(x0), self.segments[self.stage(step)], x0.device)
        scale = self._draw_scale(len(x0), x0.device)
        cond = batch.cond.with_guidance(scale) if gen.guided else batch.cond
        x_t = schedule.add_noise(x0, torch.randn_like(x0), t)
        if phase == "critic":
            with torch.no_grad():
                fake = self.generator(x_t, t, cond)
            return self._discriminator_loss(x0, fake, batch.cond)
        with torch.no_grad():
            target = self._target_x0(x_t, t, t_prev, t_edge, batch, cond, scale)
        pred = self.generator(x_t, t, cond)
        per_sample = consistency_loss(pred, target, self.loss_kind, self.huber_c)
        if self.weighting == "ict":
            weights = consistency_weights(schedule, gen.solver_grid(), t, t_prev, self.weighting_power)
            per_sample = per_sample * weights.to(per_sample)
        logs: dict[str, float | Tensor] = {"consistency_loss": per_sample.mean().detach()}
        loss = per_sample.mean()
        if self.critic is not None:
            _, logits = self.critic(*noised(self.teacher.schedule, pred, batch.cond, self.gan_t_max), logits=True)
            gan = gan_generator_loss(logits).mean()
            logs["gan_generator_loss"] = gan.detach()
            loss = loss + self.gan_generator_weight * gan
        return LossOutput(loss, logs)

    def _discriminator_loss(self, real: Tensor, fake: Tensor, cond) -> LossOutput:
        """DMD2 Eq. 6 on the critic's head: real samples vs the student's x0, each freshly noised."""
        _, logits_real = self.critic(*noised(self.teacher.schedule, real, cond, self.gan_t_max), logits=True)
        _, logits_fake = self.critic(*noised(self.teacher.schedule, fake, cond, self.gan_t_max), logits=True)
        gan = gan_discriminator_loss(logits_real, logits_fake).mean()
        return LossOutput(gan, {"gan_critic_loss": gan.detach(), "logit_real": logits_real.mean().detach(),
                                "logit_fake": logits_fake.mean().detach()})

    def _times(self, gen: ConsistencyGenerator, n: int, segments: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: t_n (uniform over the M solver points), t_{n-1} one solver step below, and the
        lower edge of t_n's segment (0 for S = 1)."""
        grid = gen.solver_grid().to(device)
        m = gen.solver_steps
        index = torch.randint(0, m, (n,), device=device)          # descending index of t_n
        per_segment = m // segments
        edge_ascending = ((m - index - 1) // per_segment) * per_segment
        return grid[index], grid[index + 1], grid[m - edge_ascending]

    def _draw_scale(self, n: int, device) -> Tensor | float:
        lo, hi = self.guidance_range
        if lo == hi:
            return lo
        return lo + (hi - lo) * torch.rand(n, device=device)

    def _target_x0(self, x_t: Tensor, t: Tensor, t_prev: Tensor, t_edge: Tensor, batch: Batch, cond,
                   scale: Tensor | float) -> Tensor:
        """The x0 target at t_n: one teacher solver step to t_{n-1}, the target network's jump from
        there to the segment edge (none when t_{n-1} is the edge), inverted back through t_n."""
        schedule = self.teacher.schedule
        x0_teacher = self.teacher.predict(x_t, t, batch.cond, guidance_scale=scale)
        x_prev = ddim_jump(schedule, x_t, x0_teacher, t, t_prev)
        online = unwrap(self.generator)
        x0_prev = online(x_prev, t_prev, cond) if self.target is None else self.target.predict(online, x_prev, t_prev, cond)
        on_edge = (t_prev <= t_edge).reshape(-1, *([1] * (x_t.dim() - 1)))
        x_edge = torch.where(on_edge, x_prev, ddim_jump(schedule, x_prev, x0_prev, t_prev, t_edge))
        return ddim_invert(schedule, x_edge, x_t, t, t_edge)


def consistency_weights(schedule: NoiseSchedule, grid: Tensor, t: Tensor, t_prev: Tensor,
                        power: float = 1.0) -> Tensor:
    """iCT's loss weights (Song & Dhariwal 2023, Sec. 3.4: lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i))
    per sample [B] for the step t_n -> t_{n-1}, with sigma(t) = sigma_t / alpha_t (EDM's noise level of the
    VP or flow state) and the weights normalised to mean 1 over the M steps of the descending ``grid``, so
    the loss keeps LCM's scale while its low-noise steps count more (x0-space errors shrink with t). A step
    from sigma = infinity (a flow grid's t = 1, weight 0 by the formula) gets the grid's smallest weight.
    ``power`` raises the weights to that exponent before normalising (1: iCT's)."""
    def edm_sigma(time: Tensor) -> Tensor:
        return schedule.sigma(time) / schedule.alpha(time)

    levels = edm_sigma(grid)
    on_grid = 1.0 / (levels[:-1] - levels[1:])
    floor = on_grid[on_grid > 0].min()
    raw = (1.0 / (edm_sigma(t) - edm_sigma(t_prev))).clamp_min(floor)
    return raw ** power / (on_grid.clamp_min(floor) ** power).mean()


def _target_network(generator: ConsistencyGenerator) -> nn.Module:
    """An EMA copy of the student, or for a LoRA student an EMA of its adapters alone."""
    return _LoraTarget(generator) if has_lora(generator.denoiser.backbone) else _EMACopy(generator)


class _EMACopy(EMA):
    """The target network as a frozen EMA copy of the whole student (the trainer's ``EMA``)."""

    def predict(self, online: ConsistencyGenerator, x_t: Tensor, t: Tensor, cond) -> Tensor:
        return self.model(x_t, t, cond)


class _LoraTarget(nn.Module):
    """The target network of a LoRA student: the shared base with the EMA adapter weights swapped in
    (two LoRA copies in memory instead of a second base)."""

    def __init__(self, generator: ConsistencyGenerator) -> None:
        super().__init__()
        self.ema = LoraEMA(generator.denoiser.backbone)

    def predict(self, online: ConsistencyGenerator, x_t: Tensor, t: Tensor, cond) -> Tensor:
        with self.ema.swapped_in(online.denoiser.backbone):
            return online(x_t, t, cond)

    def update(self, online: ConsistencyGenerator, decay: float) -> None:
        self.ema.update(online.denoiser.backbone, decay)
