"""What a digits FID means: the scores of real digits themselves, at the evaluation's sample count.

The digits FID compares 1,797 generated digits with the same 1,797 real digits, so a finite-sample
term sits in every number. Two real-data references bracket what a generator can score:

- **fresh real digits**: a sample of the true distribution that shares no digit with the reference.
  There are no more digits, so we measure disjoint class-stratified subsets of n vs n digits
  (the evaluation's labels match the real class counts) and extrapolate with FID's 1/n bias two
  ways: a least-squares ``FID(n, n) ~= a + 2c/n`` over the sizes, and pure ``1/n`` scaling of the
  largest size (``a = 0``). A generator that draws new digits from the data distribution scores
  about that at 1,797 vs 1,797 (measured: 0.21 and 0.28).
- **a copy of the reference**: a class-stratified bootstrap resample of the 1,797 digits (digits drawn
  with replacement): what a generator that reproduces the training digits themselves scores.

Whether a generator copies its training digits shows in :func:`nearest_distances`: a copy sits much
closer to its nearest training digit than a real digit sits to its nearest *other* digit.

``scripts/digits_fid_scale.py`` prints all of it, with the teacher's spread over noise seeds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from stepdistill.eval.digits_fid import digits_fid


def stratified_disjoint(labels: Tensor, n_per_side: int, seed: int) -> tuple[Tensor, Tensor]:
    """Two disjoint index sets with ``n_per_side`` items each and the class proportions of ``labels``.

    Each class contributes ``round(count * n_per_side / len(labels))`` items to each side (the total
    may differ from ``n_per_side`` by rounding).
    """
    if not 0 < 2 * n_per_side <= len(labels):
        raise ValueError(f"n_per_side must be in 1..{len(labels) // 2}, got {n_per_side}")
    g = torch.Generator().manual_seed(seed)
    first, second = [], []
    for members in _by_class(labels):
        members = members[torch.randperm(len(members), generator=g)]
        k = int(round(len(members) * n_per_side / len(labels)))
        first.append(members[:k])
        second.append(members[k:2 * k])
    return torch.cat(first), torch.cat(second)


def stratified_bootstrap(labels: Tensor, seed: int) -> Tensor:
    """Indices drawn with replacement inside each class, keeping every class's count."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([members[torch.randint(len(members), (len(members),), generator=g)]
                      for members in _by_class(labels)])


def _by_class(labels: Tensor) -> list[Tensor]:
    """The indices of each class, in class order."""
    return [(labels == c).nonzero().flatten() for c in labels.unique()]


def fresh_sample_fid(images: Tensor, labels: Tensor, sizes=(300, 450, 600, 898), seeds=range(6)) -> dict:
    """FID of disjoint real subsets at each size, and its extrapolation to two full-size sets.

    Returns:
        {"by_size": {n: [mean, std]}, "fit": {"a": ..., "c": ...},
         "at_full_size": {"fit": a + 2c/N, "largest_n": mean at the largest n * n / N}} with N = len(images)
    """
    by_size = {}
    for n in sizes:
        values = []
        for seed in seeds:
            first, second = stratified_disjoint(labels, n, seed)
            values.append(digits_fid(images[first], real=images[second]))
        by_size[int(n)] = [float(np.mean(values)), float(np.std(values))]
    inv = np.array([2.0 / n for n in by_size])
    means = np.array([m for m, _ in by_size.values()])
    c, a = np.linalg.lstsq(np.stack([inv, np.ones_like(inv)], 1), means, rcond=None)[0]
    largest = max(by_size)
    return {"by_size": by_size, "fit": {"a": float(a), "c": float(c)},
            "at_full_size": {"fit": float(a + 2.0 * c / len(images)),
                             "largest_n": by_size[largest][0] * largest / len(images)}}


def copy_fid(images: Tensor, labels: Tensor, seeds=range(10)) -> list[float]:
    """FID of class-stratified bootstrap copies of ``images`` against ``images`` itself."""
    return [digits_fid(images[stratified_bootstrap(labels, seed)], real=images) for seed in seeds]


def nearest_distances(samples: Tensor, reference: Tensor, *, exclude_self: bool = False) -> Tensor:
    """Pixel-space L2 distance [N] from each sample to its nearest reference image; with
    ``exclude_self`` (samples = reference) each image's nearest *other* image (leave-one-out)."""
    d = torch.cdist(samples.flatten(1).double(), reference.flatten(1).double())
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(dim=1).values
