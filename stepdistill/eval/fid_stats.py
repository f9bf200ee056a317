"""Feature statistics (FID's Gaussian plus a feature sample), their .npz files and cache, KID and
precision / recall, and the Frechet distance (from mu and sigma, or from the features themselves).

A statistics .npz holds ``mu`` ``[F]`` and ``sigma`` ``[F, F]`` (float64, covariance with N - 1),
``n`` (images), ``features`` (float32 ``[min(n, MAX_FEATURES), F]``: all features, or a random
subset drawn with ``numpy.random.default_rng(0)`` when there are more, for KID and precision /
recall), and ``feature`` / ``protocol`` (strings). Files with only ``mu`` and ``sigma`` (pytorch-fid,
clean-fid) are read too; KID and precision / recall are then None.
Statistics of an image directory are cached as ``cache_dir()/fid_stats/<name>-<key>.npz``; the key
hashes the directory's file list (relative names, sizes, mtimes), the protocol and the feature
network's identity, so a changed file or network makes a new entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stepdistill.cache import cache_dir
from stepdistill.errors import StepdistillError

MAX_FEATURES = 10_000
_CACHE_VERSION = "1"


@dataclass
class FeatureStats:
    """mu ``[F]``, sigma ``[F, F]`` (float64), n images, features (float32 ``[<= MAX_FEATURES, F]`` or None)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None
    features: np.ndarray | None = None
    feature: str | None = None
    protocol: str | None = None


class StatsAccumulator:
    """Running float64 sums of x and x x^T over batches, and the rows kept as the feature sample.

    Args:
        n: how many rows will come (the sample's indices are drawn from it up front).
        keep: sample size (all rows when ``n <= keep``).
    """

    def __init__(self, n: int, keep: int = MAX_FEATURES, seed: int = 0) -> None:
        self.n_expected = n
        chosen = np.arange(n) if n <= keep else np.sort(np.random.default_rng(seed).choice(n, keep, replace=False))
        self._keep = chosen
        self._kept: list[np.ndarray] = []
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None
        self.n = 0

    def update(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        if self._sum is None:
            self._sum = np.zeros(features.shape[1])
            self._outer = np.zeros((features.shape[1], features.shape[1]))
        self._sum += features.sum(axis=0)
        self._outer += features.T @ features
        rows = self._keep[(self._keep >= self.n) & (self._keep < self.n + len(features))] - self.n
        self._kept.append(features[rows].astype(np.float32))
        self.n += len(features)

    def stats(self, feature: str | None = None, protocol: str | None = None) -> FeatureStats:
        if self.n < 2 or self._sum is None:
            raise StepdistillError(f"FID needs at least 2 images per set; got {self.n}")
        mu = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return FeatureStats(mu, sigma, self.n, np.concatenate(self._kept), feature, protocol)


# --------------------------------------------------------------------------- files and cache
def save_stats(path: str | Path, stats: FeatureStats) -> None:
    """Write ``stats`` to ``path`` atomically (a temporary file in the same directory, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n if stats.n is not None else -1)}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    for key in ("feature", "protocol"):
        if getattr(stats, key) is not None:
            arrays[key] = np.array(getattr(stats, key))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a cache entry is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_stats(path: str | Path) -> FeatureStats:
    """Read a statistics .npz (ours, or any with ``mu`` and ``sigma``); a one-line error otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data or "sigma" not in data:
                raise StepdistillError(f"{str(path)!r} is not a FID statistics .npz: it needs arrays mu and sigma "
                                       f"(has {', '.join(data.files) or 'none'})")
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            n = int(data["n"]) if "n" in data and int(data["n"]) >= 0 else None
            features = data["features"].astype(np.float32) if "features" in data else None
            feature = str(data["feature"]) if "feature" in data else None
            protocol = str(data["protocol"]) if "protocol" in data else None
    except StepdistillError:
        raise
    except Exception as err:  # BadZipFile, ValueError (pickled arrays), OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"cannot read statistics {str(path)!r} ({reason}); pass a .npz written by "
                               "`stepdistill eval-fid` or with arrays mu and sigma") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StepdistillError(f"statistics {str(path)!r}: mu {mu.shape} and sigma {sigma.shape} do not match")
    return FeatureStats(mu, sigma, n, features, feature, protocol)


def cache_path(directory: Path, files: list[Path], feature: str, protocol: str, identity: str) -> Path:
    """``cache_dir()/fid_stats/<dir name>-<feature>-<key>.npz`` for a directory's images."""
    digest = hashlib.sha1(f"v{_CACHE_VERSION}\0{protocol}\0{feature}\0{identity}\0".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(directory).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{directory.resolve().name}-{feature}")
    return cache_dir() / "fid_stats" / f"{safe[:80]}-{digest.hexdigest()[:20]}.npz"


# --------------------------------------------------------------------------- FID, KID, precision / recall
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


def frechet_distance_features(real: np.ndarray, fake: np.ndarray) -> float:
    """The Frechet distance between the Gaussians of two feature sets ``[n1, F]``, ``[n2, F]``, from the
    features themselves (float64): with centred features A, B and covariances ``A^T A / (n1 - 1)``,
    ``B^T B / (n2 - 1)``, the nonzero eigenvalues of ``sigma1 sigma2`` are the squared singular values
    of ``A B^T / sqrt((n1 - 1)(n2 - 1))``, so ``tr((sigma1 sigma2)^1/2)`` is their sum. Exact where a
    covariance is rank-deficient (n <= F), where the eigenvalue route of ``frechet_distance`` adds
    the square roots of F - n rounding-level eigenvalues; ``compute_fid`` uses it when a set has no
    more images than features and both sets' features are all kept.
    """
    a, b = (torch.from_numpy(np.asarray(x, dtype=np.float64)) for x in (real, fake))
    mu_a, mu_b = a.mean(0), b.mean(0)
    a, b = a - mu_a, b - mu_b
    na, nb = len(a) - 1, len(b) - 1
    cross = torch.linalg.svdvals(a @ b.T).sum() / (na * nb) ** 0.5
    return float((mu_a - mu_b).square().sum() + a.square().sum() / na + b.square().sum() / nb - 2 * cross)


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 with the kernel
    ``k(x, y) = (x.y / d + 1)^3``, over ``subsets`` random subsets of ``m = min(subset_size, n_real,
    n_fake)`` rows of each set (drawn with ``numpy.random.default_rng(seed)``); mean and (population)
    standard deviation over subsets, as torchmetrics' ``KernelInceptionDistance``.
    """
    real_t, fake_t = torch.from_numpy(np.asarray(real, np.float64)), torch.from_numpy(np.asarray(fake, np.float64))
    m = min(subset_size, len(real_t), len(fake_t))
    if m < 2:
        raise StepdistillError(f"KID needs at least 2 features per set; got {len(real_t)} and {len(fake_t)}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real_t[torch.from_numpy(rng.permutation(len(real_t))[:m])]
        y = fake_t[torch.from_numpy(rng.permutation(len(fake_t))[:m])]
        values.append(_mmd2_unbiased(x, y))
    scores = torch.stack(values)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d, m = x.shape[1], x.shape[0]
    k_xx, k_yy, k_xy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off_diagonal = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off_diagonal - 2 * k_xy.sum() / m**2


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float] | tuple[None, None]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of
    balls around its points with radius the distance to the point's k-th nearest other point;
    precision is the share of fake points inside the real manifold, recall the share of real points
    inside the fake one. (None, None) when a set has k points or fewer.
    """
    real_t, fake_t = torch.from_numpy(np.asarray(real, np.float64)), torch.from_numpy(np.asarray(fake, np.float64))
    if len(real_t) <= k or len(fake_t) <= k:
        return None, None
    real_r2, fake_r2 = _knn_radius2(real_t, k), _knn_radius2(fake_t, k)
    return _coverage(fake_t, real_t, real_r2), _coverage(real_t, fake_t, fake_r2)


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` in float64 (clamped at 0)."""
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min(0)


def _knn_radius2(points: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point (itself is the 0th)."""
    return torch.cat([_sq_dist(points[i:i + chunk], points).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(points), chunk)])


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radius2: torch.Tensor, chunk: int = 1024) -> float:
    """Share of ``queries`` within radius of at least one centre."""
    inside = 0
    for i in range(0, len(queries), chunk):
        inside += int((_sq_dist(queries[i:i + chunk], centres) <= radius2).any(dim=1).sum())
    return inside / len(queries)
