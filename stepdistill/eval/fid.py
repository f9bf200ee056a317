"""Digits FID and class accuracy, from the shipped digits classifier's penultimate features.

FID goes through torchmetrics' ``FrechetInceptionDistance`` with a custom feature module
(:class:`DigitsFeatures`) instead of Inception v3: Inception needs torch-fidelity and its weights,
and means little on 8x8 grey digits. Numbers are therefore comparable only with other digits FIDs
from the same classifier, at the same sample count (FID on few samples is biased upwards).

What torchmetrics asks of a custom feature module (read from torchmetrics 1.9's ``image/fid.py``):
- ``forward(imgs) -> [B, d]``; ``update`` passes the images through untouched (no resizing, no
  uint8 cast for custom modules); with ``normalize=True`` we feed float images in [0, 1].
- the feature width, either as an int ``num_features`` attribute or, without it, inferred from a
  dummy forward on ``input_img_size`` (default ``(3, 299, 299)``, which an 8x8 network rejects), so
  the module sets ``num_features``.
- features are accumulated in float64, but ``compute()`` casts the FID back to the features' dtype,
  so the module returns float64 to keep the result in float64.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from stepdistill.data.digits import load_digits_tensors, to_unit
from stepdistill.eval.digits_classifier import DigitsClassifier, load_classifier

if TYPE_CHECKING:  # torchmetrics takes seconds to import; load it on first use
    from torchmetrics.image.fid import FrechetInceptionDistance

_BATCH = 512
_CACHE_SIZE = 4
#: (id(classifier), real-set key) -> (classifier, metric holding the real statistics)
_METRICS: OrderedDict[tuple[int, str], tuple[nn.Module, FrechetInceptionDistance]] = OrderedDict()


class DigitsFeatures(nn.Module):
    """torchmetrics feature module: float images in [0, 1] -> float64 classifier features.

    Args:
        classifier: a :class:`DigitsClassifier` (anything with ``features`` and ``feature_dim``).
    """

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = int(classifier.feature_dim)

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 8, 8]`` in [0, 1] (uint8 0..255 also accepted) -> ``[B, num_features]`` float64."""
        if imgs.dtype == torch.uint8:
            imgs = imgs.float() / 255.0
        return self.classifier.features(imgs.float() * 2.0 - 1.0).double()


@functools.cache
def default_classifier() -> DigitsClassifier:
    """The shipped digits classifier, loaded once per process."""
    return load_classifier()


@torch.no_grad()
def digits_features(images: torch.Tensor, classifier: nn.Module | None = None) -> torch.Tensor:
    """Features exactly as the FID sees them: ``images`` ``[N, 1, 8, 8]`` in [-1, 1] are clamped
    to [-1, 1] (via :func:`to_unit`) and passed through :class:`DigitsFeatures`.

    Returns:
        float64 ``[N, F]``.
    """
    module = DigitsFeatures(classifier if classifier is not None else default_classifier())
    return torch.cat([module(to_unit(chunk)) for chunk in images.split(_BATCH)])


def _real_key(real: torch.Tensor | None) -> str:
    if real is None:
        return "digits"
    arr = real.detach().cpu().contiguous().numpy()
    return f"{arr.shape}:{arr.dtype}:{hashlib.sha1(arr.tobytes()).hexdigest()}"


def _metric(classifier: nn.Module, real: torch.Tensor | None) -> FrechetInceptionDistance:
    """A metric whose real statistics are computed once per (classifier, real set) and kept."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    key = (id(classifier), _real_key(real))
    if key in _METRICS:
        _METRICS.move_to_end(key)
        return _METRICS[key][1]
    metric = FrechetInceptionDistance(
        feature=DigitsFeatures(classifier), normalize=True, reset_real_features=False
    )
    images = load_digits_tensors()[0] if real is None else real
    for chunk in images.split(_BATCH):
        metric.update(to_unit(chunk.float()), real=True)
    # the cache holds the classifier too, so its id cannot be reused while the entry lives
    _METRICS[key] = (classifier, metric)
    if len(_METRICS) > _CACHE_SIZE:
        _METRICS.popitem(last=False)
    return metric


def digits_fid(
    fake: torch.Tensor,
    real: torch.Tensor | None = None,
    classifier: nn.Module | None = None,
) -> float:
    """FID between ``fake`` and ``real`` digits in the classifier's feature space.

    Images outside [-1, 1] are clamped, as when saved as pictures. The real statistics are cached
    in-process per (classifier, real set), so repeated calls only compute the fake features.

    Args:
        fake: ``[N, 1, 8, 8]`` in [-1, 1], N >= 2.
        real: ``[M, 1, 8, 8]`` in [-1, 1]; default all 1,797 digits.
        classifier: default the shipped classifier.
    """
    classifier = classifier if classifier is not None else default_classifier()
    metric = _metric(classifier, real)
    metric.reset()  # fake statistics only: reset_real_features=False keeps the real ones
    for chunk in fake.detach().cpu().split(_BATCH):
        metric.update(to_unit(chunk.float()), real=False)
    fid = float(metric.compute())
    metric.reset()
    return fid


def _float64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 without scipy:
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^1/2 sigma2 sigma1^1/2)^1/2)``,
    the symmetric form of ``tr((sigma1 sigma2)^1/2)``, with eigenvalues clamped at 0.

    Args:
        mu1, mu2: ``[F]`` means; sigma1, sigma2: ``[F, F]`` covariances (tensors or arrays).
    """
    mu1, mu2, sigma1, sigma2 = (_float64(v) for v in (mu1, mu2, sigma1, sigma2))
    sigma1 = (sigma1 + sigma1.T) / 2
    sigma2 = (sigma2 + sigma2.T) / 2
    evals, evecs = torch.linalg.eigh(sigma1)
    sqrt1 = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt1 @ sigma2 @ sqrt1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    dist = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(dist)


@torch.no_grad()
def class_accuracy(
    samples: torch.Tensor, labels: torch.Tensor, classifier: nn.Module | None = None
) -> float:
    """Fraction of ``samples`` ``[N, 1, 8, 8]`` (in [-1, 1], clamped) that the classifier assigns
    to their intended class ``labels`` ``[N]``."""
    classifier = classifier if classifier is not None else default_classifier()
    if samples.shape[0] != labels.shape[0]:
        raise ValueError(f"{samples.shape[0]} samples but {labels.shape[0]} labels")
    batches = zip(samples.detach().cpu().split(_BATCH), labels.cpu().split(_BATCH), strict=True)
    correct = 0
    for chunk, target in batches:
        logits = classifier(to_unit(chunk.float()) * 2.0 - 1.0)
        correct += int((logits.argmax(dim=1) == target).sum())
    return correct / max(samples.shape[0], 1)


def digits_metrics(samples: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """FID against all 1,797 digits and class accuracy, both with the shipped classifier.

    Args:
        samples: ``[N, 1, 8, 8]`` generated digits in [-1, 1]; labels: ``[N]`` the classes asked for.
    """
    return {"fid": digits_fid(samples), "class_accuracy": class_accuracy(samples, labels)}
