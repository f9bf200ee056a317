"""SiD: Score identity Distillation (Zhou et al., ICML 2024), with SiD-LSG's guidance (Zhou et al.
2024b), few-step SiD's backward simulation, Zero-/Anti-CFG and optional diffusion GAN (Zhou et al.
2025; SiDA, Zhou et al. 2024c).

Two phases alternating 1:1 (the official training loop): the critic (fake score f_psi) learns the
generator's distribution with the ordinary denoising loss on its samples; the generator minimises
``losses.sid_generator_loss`` at x_t = noise(x_g, t), t in the lower 80% of the time range, with
y_r = teacher x0 and y_f = critic x0 there. Data-free unless the GAN term is on.

Guidance (SiD-LSG, "long and short guidance"), CFG ``u + s (c - u)`` with s = 1 meaning none:
``guidance_train_critic`` when training the critic (its guided output is what the denoising loss
regresses), ``guidance_eval_critic`` when evaluating y_f, ``guidance_teacher`` when evaluating y_r.
``cfg_mode="zero"``: teacher unguided, critic unconditional (``Conditioning.null()``) everywhere;
``cfg_mode="anti"``: teacher unguided, critic evaluated with negative guidance (s < 1).

Few-step SiD: a K-step generator (``generator.steps = K``) draws k in 1..K per iteration (the same
on every process, from ``shared_generator(step)``), runs k - 1 steps without grad and trains step k,
so the loss matches the uniform mixture of all steps' outputs to the data (``common.student_sample``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdistill.algorithms.base import Batch, LossOutput, unwrap
from stepdistill.algorithms.common import CriticGeneratorAlgorithm
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.guidance import cfg, parse_scale
from stepdistill.losses import (
    EDM_P_MEAN,
    EDM_P_STD,
    denoising_loss,
    edm_denoising_loss,
    gan_discriminator_loss,
    gan_generator_loss,
    sid_generator_loss,
)
from stepdistill.roles import Critic, Generator, Teacher
from stepdistill.schedules import Prediction

CFG_MODES = ("lsg", "zero", "anti")
CRITIC_LOSSES = ("eps_uniform", "edm")


class SiD(CriticGeneratorAlgorithm):
    """Score identity Distillation over any teacher / generator / critic.

    Args:
        teacher: frozen teacher.
        generator: the 1..K-step student (SiD-LSG starts its one step at ``Generator(t_max=0.625)``).
        critic: the fake-score network (``head=True`` for the GAN term).
        alpha: SiD's alpha (1.2); it only acts through the gradients through y_r, y_f (see
            ``grad_through_scores``).
        t_min, t_max: range of t for the generator loss. Default [0.02, 0.8]: the official code
            draws its noise level in the lower 80% of its (EDM, rho = 7) time range, sigma up to
            ~24, which is t = 0.8 on DDPM's linear table but t ~ 0.96 on a flow schedule
            (sigma / alpha = t / (1 - t)): flow teachers want a larger t_max (toy2d: 0.98, measured).
            The lower end 0.02 is DMD2's (near t = 0, y_r ~ y_f ~ x_t carry no signal).
        generator_loss_scale: multiplies the generator loss (x100 in the official code, which sums
            over elements and averages over the batch, as here). Adam is invariant to it; it matters
            for gradient clipping (the official code does not clip) and Adam's eps.
        grad_through_scores: let gradients flow through the teacher's and critic's input x_t into
            x_g (the official code does; the teacher and critic parameters still get none). Without
            it y_r, y_f are constants and alpha has no effect: the gradient is DMD's direction
            ``(y_f - y_r) / norm``. Default True (faithful, and the only setting where SiD differs
            from DMD); it costs a backward through both networks: on the shipped digits UNet (0.9M
            parameters, batch 64, CPU) a generator step took 1.6-1.7x the time and kept 2.9x the
            activations for backward (134 vs 45 MiB).
        critic_updates_per_generator_update: critic steps per generator step (1 in SiD).
        critic_t_min, critic_t_max: range of t for the critic's denoising loss (default [0, 1], the
            full range; SiD-LSG trains both phases on timesteps [20, 980): 0.02, 0.98). With
            ``critic_loss="edm"`` the drawn t is clamped into this range.
        critic_loss: the critic's denoising loss. "eps_uniform" (default): the network's own
            regression target (eps for SD) at t uniform over the range, as SiD-LSG does for Stable
            Diffusion. "edm": the official pixel-space SiD's EDM loss (Karras et al. 2022, eq. 8 /
            Table 1): ln sigma ~ N(-1.2, 1.2^2) as a VP sigma ratio sigma / alpha, mapped to t
            (``NoiseSchedule.t_from_sigma_ratio``), weighted x0 error ``losses.edm_denoising_loss``;
            meant for pixel-space teachers.
        cfg_mode: "lsg" (the three scales below), "zero" (teacher without CFG, critic unconditional)
            or "anti" (teacher without CFG, critic evaluated at ``guidance_eval_critic`` < 1, i.e. a
            negative guidance strength s - 1; the paper's exact value is not pinned down here).
        guidance_teacher: teacher CFG scale for y_r (None: the teacher's own; must be 1 or None
            outside "lsg"; [lo, hi]: random-scale CFG, a scale drawn per sample at every call).
        guidance_train_critic: CFG scale of the critic's output in its denoising loss (1 = none).
        guidance_eval_critic: CFG scale of the critic's output y_f in the generator loss.
        gan_weight: weight of the non-saturating GAN term ``softplus(-D(x_t))`` in the generator
            loss (0 = off, data-free); needs ``critic.head`` and real data.
        gan_critic_weight: weight of the discriminator loss in the critic phase (when gan_weight > 0).
        gan_warmup_steps: optimizer steps before the generator's GAN term switches on (the
            discriminator trains from step 0, so it is ready when the term starts).
        seed: seed of the choices shared by all processes (backward-simulation k).
    """

    def __init__(self, teacher: Teacher, generator: Generator, critic: Critic, *, alpha: float = 1.2,
                 t_min: float = 0.02, t_max: float = 0.8, generator_loss_scale: float = 100.0,
                 grad_through_scores: bool = True, critic_updates_per_generator_update: int = 1,
                 critic_t_min: float = 0.0, critic_t_max: float = 1.0, critic_loss: str = "eps_uniform",
                 cfg_mode: str = "lsg", guidance_teacher: float | list[float] | None = None,
                 guidance_train_critic: float = 1.0, guidance_eval_critic: float = 1.0,
                 gan_weight: float = 0.0, gan_critic_weight: float = 1e-2, gan_warmup_steps: int = 0,
                 seed: int = 0) -> None:
        super().__init__(teacher, generator, seed)
        self.critic = critic
        self.alpha = float(alpha)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.critic_t_min, self.critic_t_max = float(critic_t_min), float(critic_t_max)
        self.critic_loss = str(critic_loss)
        self.generator_loss_scale = float(generator_loss_scale)
        self.grad_through_scores = bool(grad_through_scores)
        self.ratio = int(critic_updates_per_generator_update)
        self.gan_weight, self.gan_critic_weight = float(gan_weight), float(gan_critic_weight)
        self.gan_warmup_steps = int(gan_warmup_steps)
        self.cfg_mode = cfg_mode
        self.guidance_teacher, self.guidance_train_critic, self.guidance_eval_critic = _resolve_scales(
            cfg_mode, teacher.guidance_scale if guidance_teacher is None else parse_scale(guidance_teacher, "algorithm.guidance_teacher"),
            guidance_teacher is None, float(guidance_train_critic), float(guidance_eval_critic))
        _check(self, critic)

    def gan_active(self, step: int) -> bool:
        """Whether the generator loss of optimizer step ``step`` includes the GAN term."""
        return self.gan_weight > 0 and step >= self.gan_warmup_steps

    def critic_condition(self, cond: Conditioning) -> Conditioning:
        """What the critic is conditioned on: the null condition in Zero-CFG, else ``cond``."""
        return cond.null() if self.cfg_mode == "zero" else cond

    # ----------------------------------------------------------------- generator phase
    def _generator_loss(self, batch: Batch, step: int) -> LossOutput:
        """SiD Algorithm 1, generator update: x_g = G(z); x_t = noise(x_g, t); L_G at (y_r, y_f)."""
        x_g = self.student_sample(batch.cond, step, grad=True)
        schedule = self.teacher.schedule
        t = schedule.sample_time(len(x_g), device=x_g.device, t_min=self.t_min, t_max=self.t_max)
        x_t = schedule.add_noise(x_g, torch.randn_like(x_g), t)  # differentiable in x_g
        use_gan = self.gan_active(step)
        y_real, y_fake, logits = self._scores(x_t, t, batch.cond, logits=use_gan)
        sid = sid_generator_loss(x_g, y_real, y_fake, self.alpha).mean()
        loss = self.generator_loss_scale * sid
        logs: dict[str, float | Tensor] = {"sid_loss": sid.detach()}
        if use_gan:
            gan = gan_generator_loss(logits).mean()
            loss = loss + self.gan_weight * gan
            logs["gan_generator_loss"] = gan.detach()
        return LossOutput(loss, logs)

    def _scores(self, x_t: Tensor, t: Tensor, cond: Conditioning, *,
                logits: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """(y_r, y_f, logits at x_t or None). With ``grad_through_scores`` both networks run with
        grad w.r.t. x_t (their parameters stay out of the graph: the teacher is frozen, the critic
        is not in this phase's trainable set); otherwise they see ``x_t.detach()`` without grad."""
        cond_f = self.critic_condition(cond)
        if self.grad_through_scores:  # the teacher's own call (base network, adapters off), with autograd
            y_real = self.teacher.predict(x_t, t, cond, guidance_scale=self.guidance_teacher, grad=True)
            y_fake, lg = self._critic_predict(x_t, t, cond_f, self.guidance_eval_critic, logits=logits)
            return y_real, y_fake, lg
        with torch.no_grad():
            y_real = self.teacher.predict(x_t.detach(), t, cond, guidance_scale=self.guidance_teacher)
            y_fake, _ = self._critic_predict(x_t.detach(), t, cond_f, self.guidance_eval_critic)
        lg = self.critic(x_t, t, cond_f, logits=True)[1] if logits else None  # the GAN term needs grad
        return y_real, y_fake, lg

    # ----------------------------------------------------------------- critic phase
    def _critic_loss(self, batch: Batch, step: int) -> LossOutput:
        """SiD Algorithm 1, fake-score update: denoising loss on stopgrad(x_g) over t in
        [critic_t_min, critic_t_max] (``critic_loss``; with the critic's guided output under LSG), plus
        the discriminator loss when the GAN is on."""
        x = self.student_sample(batch.cond, step, grad=False)
        schedule = self.teacher.schedule
        eps = torch.randn_like(x)
        cond_f = self.critic_condition(batch.cond)
        want_logits = self.gan_weight > 0
        if self.critic_loss == "edm":  # EDM's log-normal sigma, as a VP sigma ratio, mapped to t
            ratio = (EDM_P_MEAN + EDM_P_STD * torch.randn(len(x), dtype=torch.float64)).exp()
            t = schedule.t_from_sigma_ratio(ratio).clamp(self.critic_t_min, self.critic_t_max).to(x.device)
            x_t = schedule.add_noise(x, eps, t)
            pred, logits_fake = self._critic_predict(x_t, t, cond_f, self.guidance_train_critic, out=Prediction.X0,
                                                     logits=want_logits)
            sigma = schedule.sigma(t) / schedule.alpha(t).clamp_min(1e-12)  # the ratio at the clamped t
            denoise = edm_denoising_loss(pred, x, sigma).mean()
        else:
            t = schedule.sample_time(len(x), device=x.device, t_min=self.critic_t_min, t_max=self.critic_t_max)
            x_t = schedule.add_noise(x, eps, t)
            native = unwrap(self.critic).denoiser.prediction
            pred, logits_fake = self._critic_predict(x_t, t, cond_f, self.guidance_train_critic, out=native,
                                                     logits=want_logits)
            denoise = denoising_loss(pred, schedule.target(x, eps, t, native)).mean()
        logs: dict[str, float | Tensor] = {"critic_denoising_loss": denoise.detach()}
        loss = denoise
        if want_logits:
            if batch.x0 is None:
                raise StepdistillError("algorithm.gan_weight > 0 needs real data but this task gives none: "
                                       "set algorithm.gan_weight=0")
            # real and generated samples noised with the same (t, eps), as SiDA does
            _, logits_real = self.critic(schedule.add_noise(batch.x0.to(x), eps, t), t, cond_f, logits=True)
            gan = gan_discriminator_loss(logits_real, logits_fake).mean()
            loss = loss + self.gan_critic_weight * gan
            logs.update(gan_critic_loss=gan.detach(), logit_real=logits_real.mean().detach(),
                        logit_fake=logits_fake.mean().detach())
        return LossOutput(loss, logs)

    # ----------------------------------------------------------------- helpers
    def _critic_predict(self, x_t: Tensor, t: Tensor, cond: Conditioning, scale: float, *,
                        out: Prediction = Prediction.X0, logits: bool = False) -> tuple[Tensor, Tensor | None]:
        """The critic's CFG prediction ``u + s (c - u)`` in ``out`` (one batched forward over
        [cond; null], or a plain one at s = 1) and, if asked, the head's logits [B] of the cond
        branch. Calls go through ``self.critic`` so DDP syncs them."""
        if scale == 1.0:
            res = self.critic(x_t, t, cond, out=out, logits=logits)
            return res if logits else (res, None)
        b = x_t.shape[0]
        res = self.critic(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, cond.null()]),
                          out=out, logits=logits)
        both, lg = res if logits else (res, None)
        return cfg(both[b:], both[:b], scale), (lg[:b] if logits else None)


def _resolve_scales(mode: str, teacher: float, teacher_default: bool, train_critic: float,
                    eval_critic: float) -> tuple[float, float, float]:
    """(teacher, train-critic, eval-critic) CFG scales for ``mode``; contradictions are errors."""
    if mode not in CFG_MODES:
        raise StepdistillError(f"unknown algorithm.cfg_mode {mode!r}; allowed: {', '.join(CFG_MODES)}")
    if mode == "lsg":
        return teacher, train_critic, eval_critic
    if not teacher_default and teacher != 1.0:
        raise StepdistillError(f"cfg_mode={mode!r} runs the teacher without CFG: set algorithm.guidance_teacher=null "
                               "(or 1.0), or use cfg_mode=lsg")
    if mode == "zero":
        if (train_critic, eval_critic) != (1.0, 1.0):
            raise StepdistillError("cfg_mode='zero' makes the critic unconditional: set algorithm."
                                   "guidance_train_critic=1.0 and guidance_eval_critic=1.0")
        return 1.0, 1.0, 1.0
    if eval_critic >= 1.0:
        raise StepdistillError(f"cfg_mode='anti' needs negative guidance in the critic: set algorithm."
                               f"guidance_eval_critic < 1 (got {eval_critic}), e.g. -1.0")
    return 1.0, train_critic, eval_critic


def _check(algo: SiD, critic: Critic) -> None:
    """One-line errors for settings that cannot work."""
    if algo.ratio < 1:
        raise StepdistillError("algorithm.critic_updates_per_generator_update must be >= 1")
    if not 0.0 <= algo.t_min < algo.t_max <= 1.0:
        raise StepdistillError(f"algorithm.t_min, t_max must satisfy 0 <= t_min < t_max <= 1 "
                               f"(got {algo.t_min}, {algo.t_max})")
    if not 0.0 <= algo.critic_t_min < algo.critic_t_max <= 1.0:
        raise StepdistillError(f"algorithm.critic_t_min, critic_t_max must satisfy 0 <= critic_t_min < critic_t_max "
                               f"<= 1 (got {algo.critic_t_min}, {algo.critic_t_max})")
    if algo.critic_loss not in CRITIC_LOSSES:
        raise StepdistillError(f"unknown algorithm.critic_loss {algo.critic_loss!r}; allowed: {', '.join(CRITIC_LOSSES)}")
    if algo.gan_weight < 0 or algo.gan_critic_weight < 0 or algo.gan_warmup_steps < 0:
        raise StepdistillError("algorithm.gan_weight, gan_critic_weight and gan_warmup_steps must be >= 0")
    if algo.gan_weight > 0 and critic.head is None:
        raise StepdistillError("algorithm.gan_weight > 0 needs a discriminator head: set critic.head=true "
                               "(or algorithm.gan_weight=0)")
