"""f-distill: one-step diffusion models with f-divergence distribution matching (Xu et al. 2025).

DMD2's machinery (two time-scale critic / generator phases, the critic's denoising loss, the
diffusion-GAN terms, backward simulation for K-step generators) with one change: the generator's
distribution-matching gradient is weighted per sample by ``h(r)`` (Eq. 9),

    grad = h(r) * (x0_fake - x0_real) / mean_CHW |x - x0_real|,   r = p_teacher(x_t) / p_generator(x_t),

which turns DMD's reverse KL (h = 1) into any f-divergence (``losses.F_DIVERGENCES``; JS and
forward KL cover more modes). r is the exponentiated logit of the discriminator, at the same
(x_t, t) as the DM term, without gradient, clamped; it is normalised by a running mean per time
bin, and h(r) by its batch mean over all processes, so the weights only redistribute the gradient
across samples (``RatioNormalizer``, ``global_mean``).

Where the discriminator sits: DMD2-style, one ``DiscriminatorHead`` on the *critic's* features at
its ``default_feature_modules[0]`` (the mid block / bottleneck of a UNet, the middle block of a
transformer, the last block of the toy MLP), trained in the critic phase with the GAN loss on real
vs generated samples, both noised. (FastGen's alternative, heads on frozen teacher features at
several resolutions, is not implemented.) The head is therefore required: ``critic.head=true``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stepdistill.algorithms.base import Batch, LossOutput, unwrap
from stepdistill.algorithms.common import CriticGeneratorAlgorithm, checked_gan_t_max
from stepdistill.errors import StepdistillError
from stepdistill.guidance import parse_scale
from stepdistill.losses import (
    F_DIVERGENCES,
    density_ratio,
    distribution_matching_loss,
    f_divergence_weight,
)
from stepdistill.roles import Critic, Generator, Teacher


def _all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over all processes (a copy); ``x`` itself when torch.distributed is not running."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def global_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` [B] over the samples of every process (0-d, float64): sums and counts are
    all-reduced, so it equals the average of per-process means when the per-process batches are equal."""
    stats = _all_reduce_sum(torch.stack([x.detach().double().sum(),
                                         torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)]))
    return stats[0] / stats[1]


class RatioNormalizer(nn.Module):
    """Running mean of the density ratio r per time bin; ``forward`` returns r / running mean.

    The discriminator's calibration drifts with t and during training, so f-distill normalises r by
    a running mean per noise level (``bins`` equal bins of t in [0, 1]) before applying h. A bin's
    first batch sets its mean; later batches update it as an EMA with ``momentum``. Batch statistics
    are all-reduced over processes, so every process holds the same state. The state is buffers
    (``mean``, ``count``): the trainer checkpoints the buffers of untrained algorithm submodules, so a
    resumed run continues these statistics.

    Args:
        bins: number of time bins.
        momentum: EMA momentum (new = momentum * old + (1 - momentum) * batch mean), in [0, 1);
            0 (FastGen's default): each batch's own per-bin mean.
    """

    def __init__(self, bins: int = 10, momentum: float = 0.0) -> None:
        super().__init__()
        if bins < 1 or not 0.0 <= momentum < 1.0:
            raise StepdistillError(f"ratio normaliser needs bins >= 1 and 0 <= momentum < 1 (got {bins}, {momentum})")
        self.bins, self.momentum = int(bins), float(momentum)
        self.register_buffer("mean", torch.ones(self.bins, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(self.bins, dtype=torch.float64))

    def bin_index(self, t: Tensor) -> Tensor:
        """The bin [B] (long) of each time t [B] in [0, 1]."""
        return (t.detach().double() * self.bins).floor().long().clamp(0, self.bins - 1)

    @torch.no_grad()
    def update(self, r: Tensor, t: Tensor) -> None:
        """Fold this batch's per-bin mean of r [B] (over all processes) into the running means."""
        idx = self.bin_index(t).to(self.mean.device)
        r = r.detach().double().to(self.mean.device)
        stats = torch.zeros(2, self.bins, dtype=torch.float64, device=self.mean.device)
        stats[0].index_add_(0, idx, r)
        stats[1].index_add_(0, idx, torch.ones_like(r))
        sums, counts = _all_reduce_sum(stats)
        seen = counts > 0
        batch_mean = sums[seen] / counts[seen]
        old = self.mean[seen]
        fresh = self.count[seen] == 0
        self.mean[seen] = torch.where(fresh, batch_mean, self.momentum * old + (1 - self.momentum) * batch_mean)
        self.count += counts

    def forward(self, r: Tensor, t: Tensor, *, update: bool = True) -> Tensor:
        """r [B] / the running mean of its time bin, float64 (updated with this batch first when ``update``)."""
        if update:
            self.update(r, t)
        return r.double() / self.mean[self.bin_index(t).to(self.mean.device)].to(r.device)


@torch.no_grad()
def normalized_f_weight(r: Tensor, t: Tensor, normalizer: RatioNormalizer, divergence: str) -> tuple[Tensor, Tensor]:
    """f-distill's per-sample weight: ``h = h_f(r / running mean of r in t's bin)`` (Eq. 9, with the
    normaliser updated by this batch first), divided by the mean of h over every process's batch.

    Args:
        r: [B] density ratios (``losses.density_ratio``); t: [B] their times.
    Returns:
        ([B] float64 weights whose mean over all processes' samples is 1, the 0-d mean of h).
    """
    h = f_divergence_weight(normalizer(r, t), divergence)
    h_mean = global_mean(h)
    return h / h_mean, h_mean


class FDistill(CriticGeneratorAlgorithm):
    """f-distill over any teacher / generator / critic (with a discriminator head).

    Args:
        teacher: frozen teacher; its CFG scale is ``guidance_scale`` (s_real; 1 = none).
        generator: the 1..K-step student.
        critic: the fake-score network with a discriminator head (``Critic(..., head=True)``).
        divergence: a key of ``losses.F_DIVERGENCES`` (``js``, ``forward_kl``, ``reverse_kl`` = DMD2, ...).
        guidance_scale: teacher CFG scale for the real score (None: the teacher's default; [lo, hi]:
            random-scale CFG, a scale drawn per sample at every teacher call).
        critic_updates_per_generator_update: the two time-scale ratio (5 in the paper).
        t_min, t_max: range of the noise level for the distribution-matching loss (0.02, 0.98).
        gan_generator_weight: weight of softplus(-D(fake)) in the generator loss (0 = off).
        gan_critic_weight: weight of the discriminator loss in the critic phase (> 0: it trains r).
        gan_t_max: the discriminator sees noise levels in [0, gan_t_max] (1 = full range); above it
            r is taken as 1 (h(1) for every sample: no density-ratio information there).
        logit_clamp: discriminator logits are clamped to [-logit_clamp, logit_clamp] before exp.
        ratio_min, ratio_max: r is clamped to [ratio_min, ratio_max].
        ratio_bins: time bins of the running-mean normaliser of r.
        ratio_momentum: EMA momentum of that normaliser: 0.0 as FastGen's default (0.5 for its
            ImageNet-64 recipe); the small shipped configs were measured with 0.9.
        seed: seed of the choices shared by all processes (backward-simulation k).
    """

    def __init__(self, teacher: Teacher, generator: Generator, critic: Critic, *, divergence: str = "js",
                 guidance_scale: float | list[float] | None = None, critic_updates_per_generator_update: int = 5,
                 t_min: float = 0.02, t_max: float = 0.98, gan_generator_weight: float = 1e-3,
                 gan_critic_weight: float = 1e-2, logit_clamp: float = 10.0, ratio_min: float = 0.1,
                 ratio_max: float = 20.0, ratio_bins: int = 10, ratio_momentum: float = 0.0,
                 gan_t_max: float = 1.0, seed: int = 0) -> None:
        super().__init__(teacher, generator, seed)
        self.critic = critic
        self.gan_t_max = checked_gan_t_max(gan_t_max)
        self.divergence = str(divergence)
        self.guidance_scale = teacher.guidance_scale if guidance_scale is None else \
            parse_scale(guidance_scale, "algorithm.guidance_scale")  # a range: random-scale CFG
        self.ratio = int(critic_updates_per_generator_update)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.gan_generator_weight = float(gan_generator_weight)
        self.gan_critic_weight = float(gan_critic_weight)
        self.logit_clamp, self.ratio_min, self.ratio_max = float(logit_clamp), float(ratio_min), float(ratio_max)
        self._check(critic)
        self.ratio_normalizer = RatioNormalizer(ratio_bins, ratio_momentum)

    def _check(self, critic: Critic) -> None:
        if self.divergence not in F_DIVERGENCES:
            raise StepdistillError(f"unknown algorithm.divergence={self.divergence!r}; "
                                   f"allowed: {', '.join(F_DIVERGENCES)}")
        if unwrap(critic).head is None:
            raise StepdistillError("f-distill reads the density ratio from a discriminator head: set critic.head=true")
        if self.gan_critic_weight <= 0:
            raise StepdistillError("f-distill's density ratio needs a trained discriminator: set "
                                   "algorithm.gan_critic_weight > 0 (1e-2 in DMD2)")
        if self.ratio < 1:
            raise StepdistillError("algorithm.critic_updates_per_generator_update must be >= 1")
        if not 0 < self.ratio_min < self.ratio_max:
            raise StepdistillError(f"need 0 < algorithm.ratio_min < algorithm.ratio_max "
                                   f"(got {self.ratio_min}, {self.ratio_max})")

    # ----------------------------------------------------------------- generator phase
    def _generator_loss(self, batch: Batch, step: int) -> LossOutput:
        x = self.student_sample(batch.cond, step, grad=True)
        t, x_t, x0_real = self._teacher_at_noised(x, batch.cond, self.t_min, self.t_max, self.guidance_scale)
        with torch.no_grad():
            x0_fake, logits = self.critic(x_t, t, batch.cond, logits=True)  # r at the DM term's (x_t, t)
            beyond = t.to(logits.device) > self.teacher.schedule.max_sample_time(self.gan_t_max) + 1e-9
            logits = logits.masked_fill(beyond, 0.0)  # outside the discriminator's range: r = 1
        weight, logs = self.ratio_weight(logits, t)
        dm = distribution_matching_loss(x, x0_real, x0_fake, weight).mean()
        logs["dm_loss"] = dm.detach()
        return LossOutput(dm + self._gan_generator_term(x, batch.cond, self.gan_generator_weight, logs), logs)

    @torch.no_grad()
    def ratio_weight(self, logits: Tensor, t: Tensor) -> tuple[Tensor, dict[str, float | Tensor]]:
        """The per-sample weight [B] of the DM gradient: h(r / running mean of r in t's bin), divided
        by its mean over every process's batch (Eq. 9 with f-distill's normalisation); and its logs."""
        r = density_ratio(logits, self.logit_clamp, self.ratio_min, self.ratio_max)
        weight, h_mean = normalized_f_weight(r, t, self.ratio_normalizer, self.divergence)
        logs = {"ratio_mean": r.mean(), "h_mean": h_mean, "weight_max": weight.max(),
                "logit_generated": logits.float().mean()}
        return weight, logs

    # ----------------------------------------------------------------- critic phase
    def _critic_loss(self, batch: Batch, step: int) -> LossOutput:
        """The critic's denoising loss on generated samples plus the discriminator loss (DMD2 Eq. 6),
        which trains the head whose logit gives r."""
        if batch.x0 is None:
            raise StepdistillError("f-distill's discriminator needs real data: this task gives none")
        return self._denoising_and_gan_critic_loss(batch, step, self.gan_critic_weight)
