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

The general FID of image sets (``stepdistill eval-fid``) is :func:`stepdistill.eval.fid.compute_fid`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from stepdistill.data.digits import load_digits_tensors, to_unit
from stepdistill.eval.digits_classifier import DigitsFeatures, default_classifier

if TYPE_CHECKING:  # torchmetrics takes seconds to import; load it on first use
    from torchmetrics.image.fid import FrechetInceptionDistance

_BATCH = 512
_CACHE_SIZE = 4
#: (id(classifier), real-set key) -> (classifier, metric holding the real statistics)
_METRICS: OrderedDict[tuple[int, str], tuple[nn.Module, FrechetInceptionDistance]] = OrderedDict()


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
