"""Class-conditional 2-D Gaussian mixtures: the toy data set whose density is known exactly.

``modes`` isotropic Gaussians (standard deviation ``std``) sit evenly on a circle of ``radius``
(mode ``i`` at angle ``2 pi i / modes``, mode 0 on the positive x axis). Mode ``i`` belongs to class
``i % classes`` (round robin), so every class owns at least one mode when ``classes <= modes``.
Mode ``i`` has probability ``weights[i] / sum(weights)``; a class's probability is the sum of its
modes' probabilities, and conditioned on a class the modes are drawn in proportion to their weights.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from stepdistill.errors import StepdistillError


class ToyConfigError(StepdistillError, ValueError):
    """A bad ``data.*`` value for the toy mixture (a ValueError, and a user-facing error)."""


class ToyMixture:
    """A class-conditional mixture of isotropic 2-D Gaussians on a circle.

    Args:
        modes: number of Gaussians (>= 1).
        radius: radius of the circle the mode centers sit on (> 0 when there is more than one mode).
        std: per-coordinate standard deviation of every mode (> 0).
        weights: one positive weight per mode (normalised here); None means uniform.
        classes: number of classes (1 <= classes <= modes); 1 makes it effectively unconditional.
        seed: seed of the generator used when ``sample`` / ``sample_class`` get none, so a
            mixture's default draws are reproducible (successive calls still differ).

    Attributes:
        centers: float64 [modes, 2] mode centers.
        mode_class: long [modes], the class of each mode (``i % classes``).
        weights: float64 [modes], mode probabilities (sum to 1).
        class_probs: float64 [classes], class probabilities (sum to 1).
        mode_given_class: float64 [classes, modes], p(mode | class).
    """

    def __init__(self, modes: int = 8, radius: float = 2.0, std: float = 0.15,
                 weights: Sequence[float] | None = None, classes: int = 4, seed: int = 0) -> None:
        self.modes = _int("modes", modes, low=1)
        self.classes = _int("classes", classes, low=1)
        if self.classes > self.modes:
            raise ToyConfigError(f"data.classes is {self.classes} but data.modes is {self.modes}: every "
                                 "class needs at least one mode (classes <= modes)")
        self.radius = _float("radius", radius)
        if self.radius < 0 or (self.modes > 1 and self.radius == 0):
            raise ToyConfigError(f"data.radius must be > 0 (got {radius!r}); only a single mode may sit at 0")
        self.std = _float("std", std)
        if self.std <= 0:
            raise ToyConfigError(f"data.std must be > 0, got {std!r}")
        self.seed = int(seed)
        self.weights = _weights(weights, self.modes)

        angles = torch.arange(self.modes, dtype=torch.float64) * (2 * math.pi / self.modes)
        self.centers = self.radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        self.mode_class = torch.arange(self.modes) % self.classes
        onehot = torch.nn.functional.one_hot(self.mode_class, self.classes).T.double()  # [classes, modes]
        self.class_probs = onehot @ self.weights
        self.mode_given_class = onehot * self.weights / self.class_probs[:, None]
        self._generator = torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        w = None if bool((self.weights == self.weights[0]).all()) else [round(v, 4) for v in self.weights.tolist()]
        return (f"ToyMixture(modes={self.modes}, radius={self.radius}, std={self.std}, weights={w}, "
                f"classes={self.classes}, seed={self.seed})")

    @property
    def null_class(self) -> int:
        """The unconditional class index for classifier-free guidance (``classes``)."""
        return self.classes

    @property
    def dim(self) -> int:
        return 2

    # ----------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``n`` samples from the full mixture.

        Args:
            n: number of samples.
            generator: a CPU torch.Generator; None uses the mixture's own (seeded by ``seed``).
        Returns:
            x: float32 [n, 2]; labels: long [n] classes; mode_ids: long [n] modes.
        """
        g = self._generator if generator is None else generator
        mode_ids = _draw(self.weights.expand(int(n), -1), g)
        return self._place(mode_ids, g), self.mode_class[mode_ids], mode_ids

    def sample_class(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw one sample per label from the class-conditional mixture p(x | class).

        Used to build a reference set with exactly the labels of a generated set.

        Args:
            labels: long [n] classes in ``0 .. classes - 1``.
            generator: a CPU torch.Generator; None uses the mixture's own.
        Returns:
            float32 [n, 2] on the CPU.
        """
        return self.sample_class_with_modes(labels, generator)[0]

    def sample_class_with_modes(self, labels: Tensor,
                                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``sample_class`` that also returns the drawn mode ids (long [n])."""
        labels = self.check_labels(labels)
        g = self._generator if generator is None else generator
        mode_ids = _draw(self.mode_given_class[labels], g)
        return self._place(mode_ids, g), mode_ids

    def _place(self, mode_ids: Tensor, g: torch.Generator) -> Tensor:
        noise = torch.randn(mode_ids.shape[0], 2, generator=g, dtype=torch.float64)
        return (self.centers[mode_ids] + self.std * noise).float()

    def check_labels(self, labels: Tensor) -> Tensor:
        """``labels`` as a long [n] CPU tensor, or a ValueError if one is outside 0 .. classes - 1."""
        labels = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.classes):
            raise ValueError(f"class labels must be in 0..{self.classes - 1} for a mixture with "
                             f"{self.classes} classes, got values in {int(labels.min())}..{int(labels.max())}")
        return labels

    # ----------------------------------------------------------------- density
    def log_prob(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Exact log density log p(x) (or log p(x | class) per sample when ``labels`` is given).

        Args:
            x: [n, 2]; labels: optional long [n].
        Returns:
            float64 [n].
        """
        x = x.detach().cpu().double()
        d2 = torch.cdist(x, self.centers).pow(2)  # [n, modes]
        log_gauss = -d2 / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        w = self.weights.expand(x.shape[0], -1) if labels is None else self.mode_given_class[self.check_labels(labels)]
        return torch.logsumexp(log_gauss + w.log(), dim=1)

    def nearest_mode(self, x: Tensor, max_dist: float | None = None) -> Tensor:
        """Index of the nearest mode center for each row of ``x`` [n, 2] -> long [n].

        With ``max_dist``, samples farther than that from every center (and non-finite samples)
        get -1.
        """
        x = x.detach().cpu().double()
        dist = torch.cdist(x, self.centers)  # [n, modes]
        d, idx = dist.nan_to_num(math.inf).min(dim=1)
        bad = ~torch.isfinite(x).all(dim=1)
        if max_dist is not None:
            bad |= d > max_dist
        return torch.where(bad, torch.full_like(idx, -1), idx)


def _draw(probs: Tensor, g: torch.Generator) -> Tensor:
    """One categorical draw per row of ``probs`` [n, k] by inverse CDF (deterministic given ``g``)."""
    cdf = probs.cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # exact 1 at the end, so u < 1 always lands in range
    u = torch.rand(probs.shape[0], 1, generator=g, dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(probs.shape[1] - 1)


def _int(key: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value:
        raise ToyConfigError(f"data.{key} must be an integer, got {value!r}")
    if value < low:
        raise ToyConfigError(f"data.{key} must be >= {low}, got {value!r}")
    return int(value)


def _float(key: str, value: object) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ToyConfigError(f"data.{key} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ToyConfigError(f"data.{key} must be finite, got {value!r}")
    return out


def _weights(weights: Sequence[float] | None, modes: int) -> Tensor:
    if weights is None:
        return torch.full((modes,), 1.0 / modes, dtype=torch.float64)
    if isinstance(weights, str | bytes) or not hasattr(weights, "__len__"):
        raise ToyConfigError(f"data.weights must be a list of {modes} positive numbers, got {weights!r}")
    if len(weights) != modes:
        raise ToyConfigError(f"data.weights has {len(weights)} entries but data.modes is {modes}")
    try:
        w = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    except (TypeError, ValueError):
        raise ToyConfigError(f"data.weights must be numbers, got {list(weights)!r}") from None
    bad = [i for i, v in enumerate(w.tolist()) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ToyConfigError(f"data.weights must be positive and finite; entry {bad[0]} is {w[bad[0]].item()!r}")
    return w / w.sum()
