"""Sample diversity: mean within-class pairwise distance, and a k-NN recall (coverage of the real data).

Pure functions over feature tensors ``[N, D]`` and class labels ``[N]``: pass the digits classifier's
features (``stepdistill.eval.digits_fid.digits_features``) for digits, the points themselves for 2-D toy data.

- ``pairwise_diversity``: the mean Euclidean distance over all unordered pairs of samples; a collapsed
  set scores 0. ``class_diversity`` averages it over classes (each class counts once, whatever its
  size), so it measures variety within a class, not the distance between classes.
- ``knn_recall`` (Kynkaenniemi et al. 2019, "Improved Precision and Recall", Sec. 3): the fraction of
  real samples inside the generated manifold, the union of balls around each generated sample of
  radius its distance to its k-th nearest generated neighbour. A generator that covers only some
  modes leaves the real samples of the others outside. ``class_knn_recall`` averages it over classes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_matrix(features: Tensor) -> Tensor:
    """[N, D] float64 (any trailing shape is flattened)."""
    features = torch.as_tensor(features)
    return features.detach().cpu().reshape(len(features), -1).double()


def pairwise_diversity(features: Tensor) -> float:
    """Mean Euclidean distance over the N (N - 1) / 2 unordered pairs of ``features`` [N, D] (N >= 2)."""
    x = _as_matrix(features)
    n = len(x)
    if n < 2:
        raise ValueError(f"pairwise diversity needs at least 2 samples, got {n}")
    distances = torch.cdist(x, x)
    return float(distances.triu(diagonal=1).sum() / (n * (n - 1) / 2))


def per_class_diversity(features: Tensor, labels: Tensor) -> dict[int, float]:
    """``pairwise_diversity`` within each class with at least 2 samples: {class: value}."""
    x, labels = _as_matrix(features), torch.as_tensor(labels).cpu().reshape(-1)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} features but {len(labels)} labels")
    out = {}
    for c in torch.unique(labels).tolist():
        members = x[labels == c]
        if len(members) >= 2:
            out[int(c)] = pairwise_diversity(members)
    return out


def class_diversity(features: Tensor, labels: Tensor) -> float:
    """The mean over classes of the within-class mean pairwise distance (classes with >= 2 samples)."""
    values = per_class_diversity(features, labels)
    if not values:
        raise ValueError("no class has 2 or more samples: diversity is undefined")
    return sum(values.values()) / len(values)


def knn_radii(features: Tensor, k: int) -> Tensor:
    """[N] the distance from each row of ``features`` [N, D] to its k-th nearest other row (N > k)."""
    x = _as_matrix(features)
    if not 1 <= k < len(x):
        raise ValueError(f"k={k} needs 1 <= k < number of samples ({len(x)})")
    distances = torch.cdist(x, x)
    return distances.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)


def knn_recall(real: Tensor, fake: Tensor, k: int = 3) -> float:
    """Fraction of ``real`` [M, D] rows within the k-NN ball of at least one ``fake`` [N, D] row."""
    real_x, fake_x = _as_matrix(real), _as_matrix(fake)
    radii = knn_radii(fake_x, k)
    inside = torch.cdist(real_x, fake_x) <= radii[None, :]
    return float(inside.any(dim=1).double().mean())


def class_knn_recall(real: Tensor, real_labels: Tensor, fake: Tensor, fake_labels: Tensor, k: int = 3) -> float:
    """``knn_recall`` within each class that has more than k generated samples, averaged over those classes."""
    real_x, fake_x = _as_matrix(real), _as_matrix(fake)
    real_labels = torch.as_tensor(real_labels).cpu().reshape(-1)
    fake_labels = torch.as_tensor(fake_labels).cpu().reshape(-1)
    values = []
    for c in torch.unique(fake_labels).tolist():
        fake_c, real_c = fake_x[fake_labels == c], real_x[real_labels == c]
        if len(fake_c) > k and len(real_c) > 0:
            values.append(knn_recall(real_c, fake_c, k))
    if not values:
        raise ValueError(f"no class has more than k={k} generated samples and any real sample")
    return sum(values) / len(values)
