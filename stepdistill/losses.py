"""Pure loss functions: tensors in, per-sample [B] losses out. No modules, no optimizers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Denoising regression loss ``mean_CHW (pred - target)^2`` per sample, in the network's own
    parameterization (DDPM, Ho et al. 2020, eq. 14 for eps; rectified flow, Liu et al. 2023, eq. 1
    for velocity).

    Args:
        pred: [B, ...] network output.
        target: [B, ...] ``NoiseSchedule.target`` for the same (x0, eps, t).
    Returns:
        [B] losses.
    """
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def distribution_matching_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor,
                               weight: Tensor | None = None) -> Tensor:
    """Distribution-matching surrogate whose gradient in ``x`` is the DMD gradient.

    DMD (Yin et al. 2024a, Eq. 7-8) / DMD2 (Yin et al. 2024b, Alg. 1): the KL gradient is
    ``(x0_fake - x0_real)`` (fake minus real score, in x0 form), normalised per sample by
    ``mean_CHW |x - x0_real|``; f-distill (Xu et al. 2025, Eq. 9) multiplies it by ``h(r)``
    (``weight``). The loss ``0.5 * mean_CHW (x - sg(x - grad))^2`` has d/dx = grad / CHW.

    Args:
        x: [B, ...] generator samples (with grad).
        x0_real: [B, ...] the teacher's (guided) x0 at the noised samples, no grad.
        x0_fake: [B, ...] the critic's x0 there, no grad.
        weight: optional [B] per-sample weight h(r).
    Returns:
        [B] losses.
    """
    with torch.no_grad():
        norm = (x.double() - x0_real.double()).abs().flatten(1).mean(1).clamp_min(1e-12)
        grad = (x0_fake.double() - x0_real.double()) / norm.reshape(-1, *([1] * (x.dim() - 1)))
        if weight is not None:
            grad = grad * weight.double().reshape(-1, *([1] * (x.dim() - 1)))
        target = (x.double() - torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)).float()
    return 0.5 * (x.float() - target).pow(2).flatten(1).mean(1)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))`` per sample (Goodfellow et al. 2014;
    DMD2 Sec. 4.3, Eq. 5)."""
    return F.softplus(-logits_fake.float())


def gan_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator loss ``softplus(D(fake)) + softplus(-D(real))`` per sample (DMD2 Eq. 6)."""
    return F.softplus(logits_fake.float()) + F.softplus(-logits_real.float())


# ----------------------------------------------------------------- f-distill (Xu et al. 2025)
def _h_reverse_kl(r: Tensor) -> Tensor:
    return torch.ones_like(r)


def _h_forward_kl(r: Tensor) -> Tensor:
    return r


def _h_js(r: Tensor) -> Tensor:
    return r / (1 + r)


def _h_softened_reverse_kl(r: Tensor) -> Tensor:
    return 1 / (1 + r)


def _h_jeffreys(r: Tensor) -> Tensor:
    return 1 + r


def _h_squared_hellinger(r: Tensor) -> Tensor:
    return r.sqrt()


def _h_neyman_chi2(r: Tensor) -> Tensor:
    return 1 / r


#: f-divergence name -> its weighting function h(r) = r^2 f''(r) (f-distill, Xu et al. 2025, Eq. 9),
#: up to a constant factor (h is normalised by its batch mean before use). "reverse_kl" (h = 1) is DMD.
F_DIVERGENCES = {
    "reverse_kl": _h_reverse_kl,
    "forward_kl": _h_forward_kl,
    "js": _h_js,
    "softened_reverse_kl": _h_softened_reverse_kl,
    "jeffreys": _h_jeffreys,
    "squared_hellinger": _h_squared_hellinger,
    "neyman_chi2": _h_neyman_chi2,
}


def f_divergence_weight(r: Tensor, divergence: str) -> Tensor:
    """The f-distill weight ``h(r)`` of the distribution-matching gradient (Xu et al. 2025, Eq. 9:
    ``grad_theta D_f = E[h(r) (score_fake - score_real) dx/dtheta]`` with ``h(r) = r^2 f''(r)``).

    Args:
        r: [B] density ratios ``p_teacher(x_t) / p_generator(x_t)`` (positive).
        divergence: a key of ``F_DIVERGENCES``.
    Returns:
        [B] weights h(r).
    Raises:
        ValueError: ``divergence`` is not a key of ``F_DIVERGENCES``.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {divergence!r}; allowed: {', '.join(F_DIVERGENCES)}")
    return F_DIVERGENCES[divergence](r)


def density_ratio(logits: Tensor, logit_clamp: float = 10.0, r_min: float = 0.1, r_max: float = 20.0) -> Tensor:
    """The density ratio ``r = p_teacher / p_generator`` from discriminator logits, without gradient.

    A discriminator trained with the logistic loss (DMD2 Eq. 6) has the optimal logit
    ``log p_real(x_t) - log p_fake(x_t)`` (Goodfellow et al. 2014, Prop. 1), so ``r = exp(logit)``
    (f-distill, Xu et al. 2025, which estimates r with DMD2's GAN discriminator). Clamping the logit, then r, keeps h(r) bounded.

    Args:
        logits: [B] discriminator logits at (x_t, t).
        logit_clamp: logits are clamped to ``[-logit_clamp, logit_clamp]``.
        r_min, r_max: r is clamped to ``[r_min, r_max]``.
    Returns:
        [B] float32 ratios, detached.
    """
    with torch.no_grad():
        return logits.detach().float().clamp(-logit_clamp, logit_clamp).exp().clamp(r_min, r_max)


# ----------------------------------------------------------------- SiD (Zhou et al. 2024)
def sid_generator_loss(x_g: Tensor, y_real: Tensor, y_fake: Tensor, alpha: float = 1.2,
                       min_norm: float = 1e-5) -> Tensor:
    """Score identity Distillation generator loss per sample (Zhou et al., ICML 2024, Sec. 4 and
    Algorithm 1; the same loss in SiD-LSG and few-step SiD):

        L_G = sum_CHW (y_r - y_f) * ((y_r - x_g) - alpha (y_r - y_f)) / sg(mean_CHW |x_g - y_r|)
            = [L^(2) - alpha L^(1)] / sg(norm),  L^(2) = (y_r - y_f)^T (y_r - x_g),  L^(1) = ||y_r - y_f||^2,

    with y_r = teacher x0 and y_f = critic (fake score) x0 at x_t = noise(x_g, t). The alpha term
    enters with a MINUS sign: alpha = 1.2 (the paper's default) makes the squared score difference
    weigh ``1 - alpha = -0.2`` in ``(1 - alpha) ||y_r - y_f||^2 + (y_r - y_f)^T (y_f - x_g)``.
    With y_r, y_f held constant, ``d L_G / d x_g = (y_f - y_r) / norm`` (DMD's direction, alpha
    plays no part); alpha only acts through the gradients that flow through y_r and y_f.
    The normaliser is a stop-grad per-sample mean over that sample's elements (clamped at
    ``min_norm``, as the official code does).

    Args:
        x_g: [B, ...] generator samples (with grad).
        y_real: [B, ...] the teacher's (guided) x0 at x_t (with or without grad through x_t).
        y_fake: [B, ...] the critic's (guided) x0 at x_t.
        alpha: weight of the squared score difference (1.2 in SiD).
        min_norm: lower clamp of the normaliser.
    Returns:
        [B] float32 losses (sums over each sample's elements; the official code's batch loss is
        their mean, scaled by ``loss_scaling_G``).
    """
    x, y_r, y_f = x_g.float(), y_real.float(), y_fake.float()
    with torch.no_grad():
        norm = (x - y_r).abs().flatten(1).mean(1).clamp_min(min_norm)
    diff = y_r - y_f
    return (diff * ((y_r - x) - alpha * diff)).flatten(1).sum(1) / norm


#: EDM's training distribution and data scale (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2)
EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_DATA = -1.2, 1.2, 0.5


def edm_weight(sigma: Tensor, sigma_data: float = EDM_SIGMA_DATA) -> Tensor:
    """EDM's loss weight ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``
    (Karras et al. 2022, Table 1), which makes the effective target of its F_theta unit-variance."""
    s = sigma.double()
    return (s * s + sigma_data * sigma_data) / (s * sigma_data) ** 2


def edm_denoising_loss(x0_pred: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float = EDM_SIGMA_DATA) -> Tensor:
    """EDM's denoising loss per sample (Karras et al. 2022, eq. 8 with Table 1's weighting):
    ``lambda(sigma) * mean_CHW (D(x; sigma) - x0)^2``, D the denoiser's x0 prediction.

    The official pixel-space SiD trains its fake score with it, sigma drawn log-normal
    (``EDM_P_MEAN``, ``EDM_P_STD``). In this project's time convention (t in [0, 1], t = 0 data,
    ``x_t = alpha(t) x0 + sigma(t) eps``) EDM's sigma is the VP ratio ``sigma(t) / alpha(t)``
    (x_t / alpha(t) = x0 + sigma_EDM eps); ``NoiseSchedule.t_from_sigma_ratio`` gives the t of a
    drawn sigma. A mean over elements where EDM sums (a constant factor: Adam is invariant to it).

    Args:
        x0_pred: [B, ...] the denoiser's x0 at x_t.
        x0: [B, ...] the clean samples x_t was made from.
        sigma: [B] EDM noise levels (sigma(t) / alpha(t)) of each sample.
        sigma_data: EDM's sigma_data (0.5).
    Returns:
        [B] float32 losses.
    """
    err = (x0_pred.float() - x0.float()).pow(2).flatten(1).mean(1)
    return (edm_weight(sigma.to(err.device), sigma_data) * err.double()).float()


ICT_HUBER_C = 0.00054  # iCT's c = 0.00054 sqrt(d) for d-dimensional samples


def consistency_loss(pred: Tensor, target: Tensor, kind: str = "huber", c: float = 1e-3) -> Tensor:
    """Consistency distillation distance per sample between the student's output and the target's.

    ``"huber"``: the pseudo-Huber metric per element, ``mean_CHW sqrt((pred - target)^2 + c^2) - c``
    (LCM's released training, c = 1e-3); ``"huber_ict"``: iCT's pseudo-Huber metric on each sample's
    vector, ``sqrt(||pred - target||^2 + c^2) - c`` with c = 0.00054 sqrt(d) (Song & Dhariwal 2023,
    iCT Sec. 3.3; ``c`` is not used), divided by sqrt(d) (the scale of a per-element RMS); ``"l2"``:
    ``mean_CHW (pred - target)^2`` (CM, Song et al. 2023, Eq. 8 with d = L2^2; LCM Eq. 9). All in x0 space.

    Args:
        pred: [B, ...] the student's output (with grad).
        target: [B, ...] the target (no grad).
    Returns:
        [B] losses.
    """
    diff = pred.float() - target.float()
    if kind == "huber":
        return (diff.pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)
    if kind == "huber_ict":
        flat = diff.flatten(1)
        dim = flat.shape[1]
        c_ict = ICT_HUBER_C * dim ** 0.5
        return ((flat.pow(2).sum(1) + c_ict * c_ict).sqrt() - c_ict) / dim ** 0.5
    if kind == "l2":
        return diff.pow(2).flatten(1).mean(1)
    raise ValueError(f"unknown consistency loss {kind!r}; expected 'huber', 'huber_ict' or 'l2'")


def guidance_distillation_loss(pred: Tensor, cfg_target: Tensor) -> Tensor:
    """AGD's guidance-distillation objective (Jensen et al. 2025, Sec. 3):
    ``mean_CHW (f_adapted(x_t, t, c, w) - f_cfg(x_t, t, c, w))^2`` per sample, where the target is the teacher's stored CFG output at w on its own guided trajectory,
    in the teacher's own parameterization (eps / v / flow).

    Args:
        pred: [B, ...] the adapted network's output at the stored (x_t, t, c, w).
        cfg_target: [B, ...] the stored guided output.
    Returns:
        [B] losses.
    """
    return denoising_loss(pred, cfg_target)
