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

:func:`compute_fid` (``stepdistill eval-fid``) is the general FID of image sets (directories, runs,
statistics files) on Inception, digits or a user's features, with KID and precision / recall; its
parts live in ``images`` (the image protocol), ``features`` and ``fid_stats`` (statistics cache).
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from stepdistill.data.digits import load_digits_tensors, to_unit
from stepdistill.errors import StepdistillError
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


# --------------------------------------------------------------------------- FID of image sets
#: default sample count of a run when the real set's size is unknown, and the cap on the default
DEFAULT_NUM_FAKE, MAX_DEFAULT_NUM_FAKE = 10_000, 50_000


def compute_fid(real, fake, feature: str = "inception", *, inception_path=None, batch_size: int = 32,
                kid_subsets: int = 100, kid_subset_size: int = 1000, nearest_k: int = 3, progress: bool = True,
                cache: bool = True, num_fake: int | None = None, seed: int = 0, device: str | None = None) -> dict:
    """FID, KID and precision / recall between two image sets, on one feature network.

    Args:
        real: an image directory (recursive png / jpg / jpeg / webp / bmp), a statistics .npz
            (:mod:`stepdistill.eval.fid_stats`), or images ``[N, C, H, W]`` in [-1, 1].
        fake: an image directory, a training run directory (its student is sampled as ``stepdistill
            sample run=... seed=seed`` would, ``num_fake`` images), or images ``[N, C, H, W]`` in [-1, 1].
        feature: ``inception``, ``digits`` or ``pkg.module:attr`` (:mod:`stepdistill.eval.features`).
        inception_path: the Inception TorchScript file (default: ``$STEPDISTILL_INCEPTION``, then the
            file ``make inception`` fetches).
        batch_size: images per forward (and per student sampling batch).
        kid_subsets, kid_subset_size: KID's random subsets (the size capped at each set's features).
        nearest_k: k of precision / recall.
        progress: tqdm bars over feature extraction.
        cache: read / write the statistics of a real image directory in ``cache_dir()/fid_stats``.
        num_fake: images of a run to sample (default: as many as the real set, at most 50,000; 10,000
            when a statistics file does not say); for a directory or tensor, the first ``num_fake``.
        seed: the run's sampling seed and KID's subset seed.
        device: where the networks run (default: cuda when available).

    Returns:
        ``{"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake", "feature",
        "protocol"}``; KID and precision / recall are None when ``real`` is a statistics file without
        features (precision / recall also when a set has ``nearest_k`` images or fewer).

    Raises:
        StepdistillError: a missing or unreadable path, too few images, a feature network that cannot
            be found, or statistics computed with another feature network or protocol.
    """
    from stepdistill.eval import fid_stats
    from stepdistill.eval.features import get_extractor

    if batch_size < 1:
        raise StepdistillError(f"batch_size must be >= 1; got {batch_size}")
    (real_kind, real_files), (fake_kind, fake_files) = _source(real, "real"), _source(fake, "fake")
    extractor = get_extractor(feature, inception_path, device)
    real_stats = _real_stats(real, real_kind, real_files, extractor, batch_size, progress, cache)
    if num_fake is None and fake_kind == "run":
        num_fake = min(real_stats.n, MAX_DEFAULT_NUM_FAKE) if real_stats.n else DEFAULT_NUM_FAKE
    batches, n = _batches(fake, fake_kind, fake_files, batch_size, num_fake, seed, extractor.device)
    fake_stats = _extract(batches, n, extractor, progress, "fake features")
    if real_stats.mu.shape != fake_stats.mu.shape:
        raise StepdistillError(f"real statistics have {real_stats.mu.shape[0]} features, the {extractor.name} "
                               f"network gives {fake_stats.mu.shape[0]}: were they computed with another feature?")
    result = {"fid": _fid(real_stats, fake_stats),
              "kid_mean": None, "kid_std": None, "precision": None, "recall": None,
              "n_real": real_stats.n, "n_fake": fake_stats.n, "feature": extractor.name,
              "protocol": extractor.protocol}
    if real_stats.features is not None:
        result["kid_mean"], result["kid_std"] = fid_stats.kid(real_stats.features, fake_stats.features,
                                                              kid_subsets, kid_subset_size, seed)
        result["precision"], result["recall"] = fid_stats.precision_recall(real_stats.features,
                                                                           fake_stats.features, nearest_k)
    return result


def _fid(real, fake) -> float:
    """From the features when a set has no more images than features and both keep all their
    features (exact for rank-deficient covariances); from mu and sigma otherwise."""
    from stepdistill.eval.fid_stats import frechet_distance_features

    complete = all(s.features is not None and s.n is not None and len(s.features) == s.n for s in (real, fake))
    if complete and min(real.n, fake.n) <= real.mu.shape[0]:
        return frechet_distance_features(real.features, fake.features)
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


def _source(value, name: str) -> tuple[str, list[Path] | None]:
    """The kind of ``value``: ``tensor``, ``stats`` (real only), ``dir`` (with its image files) or ``run``
    (fake only); a one-line error otherwise, before any feature is computed."""
    from stepdistill.eval.images import is_run_dir, list_images

    if isinstance(value, torch.Tensor):
        if value.dim() != 4 or len(value) < 2:
            raise StepdistillError(f"{name} images must be [N, C, H, W] in [-1, 1] with N >= 2; got {tuple(value.shape)}")
        return "tensor", None
    what = "an image directory or a statistics .npz" if name == "real" else "an image directory or a run directory"
    if value is None or str(value) == "":
        raise StepdistillError(f"{name}= is required: {what}")
    path = Path(str(value)).expanduser()
    if not path.exists():
        hub = " (model hub and dataset ids are not fetched: pass a local path)" \
            if "/" in str(value) and not str(value).startswith(("/", ".", "~")) else ""
        raise StepdistillError(f"{name}={str(value)!r} not found: pass {what}{hub}")
    if path.is_file():
        if name == "real" and path.suffix == ".npz":
            return "stats", None
        raise StepdistillError(f"{name}={str(value)!r} is a file: pass {what}")
    if is_run_dir(path):
        if name == "real":
            raise StepdistillError(f"real={str(value)!r} is a training run: pass real images or statistics")
        return "run", None
    files = list_images(path)
    if len(files) < 2:
        raise StepdistillError(f"{name}={str(value)!r} holds {len(files)} image: FID needs at least 2 per set")
    return "dir", files


def _batches(source, kind: str, files: list[Path] | None, batch_size: int, limit: int | None, seed: int,
             device: str):
    """(an iterator of uint8 image batches, their count) for a directory, run or tensor."""
    from stepdistill.eval import images

    if kind == "run":
        if limit is None or limit < 2:
            raise StepdistillError(f"num_fake must be >= 2; got {limit}")
        return images.run_batches(source, limit, batch_size, seed, device), limit
    if kind == "tensor":
        source = source[:limit] if limit else source
        return images.tensor_batches(source, batch_size), len(source)
    files = files[:limit] if limit else files
    return images.file_batches(files, batch_size), len(files)


def _extract(batches, n: int, extractor, progress: bool, desc: str):
    from tqdm.auto import tqdm

    from stepdistill.eval.fid_stats import StatsAccumulator

    accumulator = StatsAccumulator(n)
    with tqdm(total=n, desc=f"{extractor.name} {desc}", unit="img", disable=not progress) as bar:
        for batch in batches:
            accumulator.update(extractor(batch))
            bar.update(len(batch))
    return accumulator.stats(extractor.name, extractor.protocol)


def _real_stats(real, kind: str, files: list[Path] | None, extractor, batch_size: int, progress: bool,
                cache: bool):
    """The real set's statistics: read from a .npz, from the cache, or extracted (and cached)."""
    from stepdistill.eval import fid_stats, images

    if kind == "stats":
        stats = fid_stats.load_stats(real)
        for key, ours in (("feature", extractor.name), ("protocol", extractor.protocol)):
            theirs = getattr(stats, key)
            if theirs is not None and theirs != ours:
                raise StepdistillError(f"statistics {str(real)!r} were computed with {key} {theirs!r}, not {ours!r}: "
                                       "pass the matching feature= or recompute them from the images")
        return stats
    if kind == "tensor":
        return _extract(images.tensor_batches(real, batch_size), len(real), extractor, progress, "real features")
    directory = Path(str(real)).expanduser()
    path = fid_stats.cache_path(directory, files, extractor.name, extractor.protocol, extractor.identity)
    if cache and path.is_file():
        try:
            return fid_stats.load_stats(path)
        except StepdistillError:
            pass  # a damaged cache entry is recomputed
    stats = _extract(images.file_batches(files, batch_size), len(files), extractor, progress, "real features")
    if cache:
        fid_stats.save_stats(path, stats)
    return stats
