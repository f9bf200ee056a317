"""Sample-quality metrics on the 2-D toy mixtures, where the true distribution is known.

Every metric compares generated samples with a fresh *true* set drawn with the same class labels
(``ToyMixture.sample_class``), so class-conditional generators are judged against p(x | class) and
label frequencies cancel out. ``reference_metrics`` gives the same numbers between two independent
true sets of the same size: the floor a perfect generator reaches at that sample size.

- ``swd``: sliced Wasserstein-2 distance (0 = identical; a shift by vector s gives |s| / sqrt(2)).
- ``mmd``: squared maximum mean discrepancy with an RBF kernel averaged over several bandwidths.
- ``mode_coverage``: fraction of modes that receive at least half their expected mass.
- ``class_accuracy``: fraction of samples whose nearest mode belongs to the requested class.

All computations run on the CPU in float64 and are deterministic given a ``torch.Generator``
(None means a fresh generator seeded with 0). Non-finite samples make ``swd`` / ``mmd`` NaN and
count for no mode and as misclassified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stepdistill.data.toy2d import ToyMixture

#: RBF bandwidths for ``mmd`` when none are given: the default mixture's (see ``mixture_bandwidths``)
DEFAULT_BANDWIDTHS: tuple[float, ...] = (0.075, 0.15, 0.3, 0.6, 2.0)
_BLOCK = 2048  # rows per kernel block, so n = 10^4 needs ~160 MB, not 800 MB


def _cpu64(x: Tensor) -> Tensor:
    x = torch.as_tensor(x).detach().cpu().double()
    if x.dim() != 2:
        raise ValueError(f"expected samples of shape [n, d], got {tuple(x.shape)}")
    return x


def _gen(generator: torch.Generator | None) -> torch.Generator:
    return torch.Generator().manual_seed(0) if generator is None else generator


def swd(x: Tensor, y: Tensor, projections: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between two equal-size sample sets.

    ``projections`` directions theta are drawn uniformly on the unit sphere (normalised Gaussians);
    along each, the 1-D W2 between the projected sets is exact for equal sizes: sort both and take
    the mean squared difference. The result is the square root of that mean over directions:
    ``SW2 = sqrt(mean_theta mean_i (sort(x theta)_i - sort(y theta)_i)^2)``. For ``y = x + s`` every
    direction contributes ``(s . theta)^2``, whose mean over the circle is ``|s|^2 / 2`` in 2-D, so
    the value is ``|s| / sqrt(2)`` (up to the Monte Carlo error of the directions).

    Args:
        x, y: [n, d] samples (same n).
        projections: number of random directions.
        generator: CPU torch.Generator for the directions.
    Returns:
        SW2 as a float (NaN if a sample is not finite).
    """
    x, y = _cpu64(x), _cpu64(y)
    if x.shape != y.shape:
        raise ValueError(f"swd needs equal-size sets of the same dimension, got {tuple(x.shape)} and {tuple(y.shape)}")
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    theta = torch.randn(x.shape[1], int(projections), generator=_gen(generator), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (theta.T @ x.T).sort(dim=1)  # [projections, n], sorted along contiguous rows
    py, _ = (theta.T @ y.T).sort(dim=1)
    return float((px - py).pow(2).mean().sqrt())


def _kernel_sum(a: Tensor, b: Tensor | None, bandwidths: Tensor) -> float:
    """Sum over all pairs (i, j) of k(a_i, b_j) = mean_h exp(-|a_i - b_j|^2 / (2 h^2)).

    ``b=None`` means ``b = a`` and uses the symmetry: only blocks on or above the diagonal.
    """
    total = 0.0
    coef = (-0.5 / bandwidths.pow(2)).tolist()
    for start in range(0, a.shape[0], _BLOCK):
        rows = a[start:start + _BLOCK]
        cols = a[start:] if b is None else b
        d2 = torch.cdist(rows, cols).square_()
        buf = torch.empty_like(d2)
        for c in coef:
            # clamping at -60 changes k by < 1e-26 and avoids exp's slow underflow path
            k = torch.mul(d2, c, out=buf).clamp_(min=-60.0).exp_()
            if b is None:  # the diagonal block holds both orders; the rest appears twice
                total += float(k[:, :rows.shape[0]].sum()) + 2 * float(k[:, rows.shape[0]:].sum())
            else:
                total += float(k.sum())
    return total / len(coef)


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
        unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy with an RBF kernel averaged over ``bandwidths``.

    ``k(a, b) = mean_h exp(-|a - b|^2 / (2 h^2))`` (so 0 < k <= 1). The unbiased estimate (default,
    Gretton et al. 2012, eq. 3) leaves out the i = j terms of the within-set sums; it is centred on
    the true MMD^2 and may be slightly negative when the sets match. The biased (V-statistic)
    estimate keeps them: it is >= 0 and exactly 0 for identical sets.

    Args:
        x: [n, d], y: [m, d] samples (sizes may differ; n, m >= 2 for the unbiased estimate).
        bandwidths: RBF length scales h.
        unbiased: U-statistic (True) or V-statistic (False).
    Returns:
        MMD^2 as a float (NaN if a sample is not finite).
    """
    x, y = _cpu64(x), _cpu64(y)
    h = torch.as_tensor(list(bandwidths), dtype=torch.float64)
    if h.numel() == 0 or bool((h <= 0).any()):
        raise ValueError(f"bandwidths must be a non-empty list of positive numbers, got {list(bandwidths)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 samples per set, got {n} and {m}")
    kxx, kyy, kxy = _kernel_sum(x, None, h), _kernel_sum(y, None, h), _kernel_sum(x, y, h)
    if unbiased:  # each set's diagonal holds k(a, a) = 1
        return (kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2 * kxy / (n * m)
    return kxx / n**2 + kyy / m**2 - 2 * kxy / (n * m)


def mixture_bandwidths(mixture: ToyMixture) -> tuple[float, ...]:
    """RBF bandwidths matched to a mixture: 0.5, 1, 2 and 4 mode stds (shape of each mode) and
    the radius (balance between modes)."""
    return tuple(f * mixture.std for f in (0.5, 1.0, 2.0, 4.0)) + (mixture.radius or mixture.std,)


def mode_coverage(x: Tensor, mixture: ToyMixture, labels: Tensor | None = None,
                  threshold: float = 0.5, max_dist_std: float = 4.0) -> float:
    """Fraction of modes that receive at least ``threshold`` of their expected number of samples.

    Each sample goes to its nearest mode center, or to no mode if it is farther than
    ``max_dist_std`` stds from every center (a true sample is, with probability exp(-8) = 3e-4 in
    2-D for 4 stds). A mode's expected count is ``n * weight`` or, with ``labels``, the sum over
    samples of p(mode | label); modes that no label can reach are left out of the fraction.

    Args:
        x: [n, 2] samples; labels: optional long [n] classes they were generated for.
    Returns:
        a float in [0, 1].
    """
    ids = mixture.nearest_mode(_cpu64(x), max_dist=max_dist_std * mixture.std)
    counts = torch.bincount(ids[ids >= 0], minlength=mixture.modes).double()
    if labels is None:
        expected = ids.shape[0] * mixture.weights
    else:
        expected = mixture.mode_given_class[mixture.check_labels(labels)].sum(dim=0)
    reachable = expected > 0
    if not bool(reachable.any()):
        return math.nan
    return float((counts[reachable] >= threshold * expected[reachable]).double().mean())


def class_accuracy(x: Tensor, labels: Tensor, mixture: ToyMixture) -> float:
    """Fraction of samples whose nearest mode center (no distance cutoff) belongs to their class.

    Args:
        x: [n, 2] samples; labels: long [n] the classes they were generated for.
    Returns:
        a float in [0, 1]; about ``sum_c p_label(c) p_class(c)`` for labels unrelated to x.
    """
    labels = mixture.check_labels(labels)
    ids = mixture.nearest_mode(_cpu64(x))
    if ids.shape[0] != labels.shape[0]:
        raise ValueError(f"{ids.shape[0]} samples but {labels.shape[0]} labels")
    if ids.numel() == 0:
        return math.nan
    predicted = torch.where(ids >= 0, mixture.mode_class[ids.clamp_min(0)], torch.full_like(ids, -1))
    return float((predicted == labels).double().mean())


def toy_metrics(x: Tensor, labels: Tensor, mixture: ToyMixture,
                generator: torch.Generator | None = None, projections: int = 256,
                bandwidths: Sequence[float] | None = None) -> dict[str, float]:
    """All toy metrics for generated ``x`` [n, 2] against a fresh true set with the same ``labels``.

    Args:
        x: [n, 2] generated samples (any device / dtype).
        labels: long [n] the class each sample was generated for.
        mixture: the true distribution.
        generator: CPU torch.Generator for the reference set and the SWD directions (None: seed 0).
        projections: SWD directions.
        bandwidths: MMD bandwidths (None: ``mixture_bandwidths(mixture)``).
    Returns:
        {"swd", "mmd", "mode_coverage", "class_accuracy"} as floats.
    """
    x = _cpu64(x)
    labels = mixture.check_labels(labels)
    if x.shape[0] != labels.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {labels.shape[0]} labels")
    g = _gen(generator)
    y = mixture.sample_class(labels, g)
    return {
        "swd": swd(x, y, projections, g),
        "mmd": mmd(x, y, mixture_bandwidths(mixture) if bandwidths is None else bandwidths),
        "mode_coverage": mode_coverage(x, mixture, labels),
        "class_accuracy": class_accuracy(x, labels, mixture),
    }


def reference_metrics(mixture: ToyMixture, n: int, labels: Tensor | None = None,
                      generator: torch.Generator | None = None, **kwargs) -> dict[str, float]:
    """``toy_metrics`` between two independent true sets of size ``n`` (the "reference" row).

    Args:
        labels: long [n] classes for both sets; None draws them from the class probabilities.
        generator: CPU torch.Generator (None: seed 0).
        kwargs: ``projections`` / ``bandwidths`` for ``toy_metrics``.
    """
    g = _gen(generator)
    labels = mixture.sample(n, g)[1] if labels is None else mixture.check_labels(labels)
    if labels.shape[0] != n:
        raise ValueError(f"n is {n} but {labels.shape[0]} labels were given")
    return toy_metrics(mixture.sample_class(labels, g), labels, mixture, g, **kwargs)
