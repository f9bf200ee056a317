"""scikit-learn's bundled 8x8 handwritten digits as tensors in [-1, 1].

1,797 grey-scale images in 10 classes, shipped inside scikit-learn (no download). Pixel values
0..16 are scaled to [-1, 1] so they match the diffusion models' data range.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
_MAX_PIXEL = 16.0


@functools.cache
def _load() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).reshape(-1, *IMAGE_SHAPE)
    images = images / (_MAX_PIXEL / 2) - 1.0
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images, labels


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits.

    Returns:
        images: float32 ``[N, 1, 8, 8]`` in [-1, 1]; labels: int64 ``[N]`` in 0..9. Fresh copies,
        so callers may modify them.
    """
    images, labels = _load()
    return images.clone(), labels.clone()


def split(seed: int = 0, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified train/test split.

    Each class contributes ``round(count * test_fraction)`` images to the test set, chosen by a
    permutation from ``numpy.random.default_rng(seed)``; the same seed gives the same split.

    Returns:
        train_idx, test_idx: sorted int64 ``[N_train]``, ``[N_test]`` indices into
        :func:`load_digits_tensors`; disjoint and together covering every image.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    _, labels = _load()
    labels_np = labels.numpy()
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels_np == c)
        n_test = int(round(len(members) * test_fraction))
        test.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels_np)), test_idx)
    return torch.from_numpy(train_idx).long(), torch.from_numpy(test_idx).long()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1], clamping values outside the range."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to uint8 0..255 (clamped, rounded), e.g. for saving PNGs."""
    return (to_unit(x) * 255.0).round().to(torch.uint8)


class DigitsData:
    """The digits (or one split of them) in memory, sampled in random batches for training loops.

    Args:
        subset: ``"all"``, ``"train"`` or ``"test"`` (the latter two from :func:`split`).
        seed: seed of the train/test split.
        test_fraction: fraction of each class held out for ``"test"``.
    """

    def __init__(self, subset: str = "all", seed: int = 0, test_fraction: float = 0.2) -> None:
        images, labels = load_digits_tensors()
        if subset != "all":
            train_idx, test_idx = split(seed, test_fraction)
            if subset == "train":
                images, labels = images[train_idx], labels[train_idx]
            elif subset == "test":
                images, labels = images[test_idx], labels[test_idx]
            else:
                raise ValueError(f"subset must be 'all', 'train' or 'test', got {subset!r}")
        self.subset = subset
        self.images = images
        self.labels = labels
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return self.labels.shape[0]

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch drawn uniformly with replacement.

        Returns:
            images float32 ``[n, 1, 8, 8]`` in [-1, 1], labels int64 ``[n]``.
        """
        idx = torch.randint(len(self), (n,), generator=generator)
        return self.images[idx], self.labels[idx]
