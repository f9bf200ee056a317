"""The general FID of image sets (``stepdistill eval-fid``): directories, runs, statistics files
and tensors, on Inception, digits or a user's features, with KID and precision / recall.

:func:`compute_fid`'s parts live in ``images`` (the image protocol), ``features`` (the feature
networks) and ``fid_stats`` (statistics, their cache, the Frechet distance, KID, precision / recall).
The digits FID of training runs (torchmetrics on the shipped classifier) is ``digits_fid``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from stepdistill.errors import StepdistillError
from stepdistill.eval import fid_stats, images
from stepdistill.eval.features import get_extractor
from stepdistill.eval.fid_stats import StatsAccumulator, frechet_distance, frechet_distance_features
from stepdistill.eval.images import is_run_dir, list_images

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
    complete = all(s.features is not None and s.n is not None and len(s.features) == s.n for s in (real, fake))
    if complete and min(real.n, fake.n) <= real.mu.shape[0]:
        return frechet_distance_features(real.features, fake.features)
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


def _source(value, name: str) -> tuple[str, list[Path] | None]:
    """The kind of ``value``: ``tensor``, ``stats`` (real only), ``dir`` (with its image files) or ``run``
    (fake only); a one-line error otherwise, before any feature is computed."""
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
    accumulator = StatsAccumulator(n)
    with tqdm(total=n, desc=f"{extractor.name} {desc}", unit="img", disable=not progress) as bar:
        for batch in batches:
            accumulator.update(extractor(batch))
            bar.update(len(batch))
    return accumulator.stats(extractor.name, extractor.protocol)


def _real_stats(real, kind: str, files: list[Path] | None, extractor, batch_size: int, progress: bool,
                cache: bool):
    """The real set's statistics: read from a .npz, from the cache, or extracted (and cached)."""
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
