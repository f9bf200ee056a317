"""A small CNN for the 8x8 digits: class accuracy of generated digits and features for a domain FID.

Inception features mean little on 8x8 grey digits, so the digits FID uses the penultimate features
of this classifier instead. The trained network ships in ``stepdistill/assets/digits_classifier/``
(``model.safetensors`` + ``config.json``); rebuild it with ``python -m
stepdistill.eval.digits_classifier``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stepdistill.data.digits import NUM_CLASSES, DigitsData
from stepdistill.errors import StepdistillError

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "assets" / "digits_classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_REBUILD = "rebuild it with `python -m stepdistill.eval.digits_classifier`"
_ARCH_KEYS = ("channels", "hidden", "feature_dim", "num_classes")


class DigitsClassifier(nn.Module):
    """Three 3x3 convs (8x8 -> 8x8 -> 4x4 -> 2x2) and an MLP; no batch norm or dropout, so
    train and eval mode compute the same function.

    Args:
        channels: output channels of the three convs.
        hidden: width of the MLP's first layer.
        feature_dim: width of the penultimate layer, the FID features.
        num_classes: number of logits.
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 64),
        hidden: int = 128,
        feature_dim: int = 64,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.config = {
            "channels": [c1, c2, c3],
            "hidden": hidden,
            "feature_dim": feature_dim,
            "num_classes": num_classes,
        }
        self.feature_dim = feature_dim
        self.convs = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.mlp = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 2 * 2, hidden),
            nn.SiLU(),
            nn.Linear(hidden, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features.

        Args:
            x: ``[B, 1, 8, 8]`` images in [-1, 1].

        Returns:
            ``[B, feature_dim]``.
        """
        return self.mlp(self.convs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of ``[B, 1, 8, 8]`` images in [-1, 1]."""
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Light augmentation so the classifier tolerates generated digits: a random shift of up to
    one pixel each way (zero-padded with the background value -1), random contrast in [0.8, 1.2],
    and Gaussian noise of std up to 0.1 on half of the batch; result clamped to [-1, 1].

    Args:
        x: ``[B, 1, 8, 8]`` in [-1, 1].
    """
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(b, 1, 8, 10)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(b, 1, 8, 8)
    shifted = shifted.gather(3, cols)
    contrast = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    shifted = (shifted + 1.0) * contrast - 1.0
    noise_std = 0.1 * torch.rand(b, 1, 1, 1, generator=generator)
    noise_std = noise_std * (torch.rand(b, 1, 1, 1, generator=generator) < 0.5)
    noisy = shifted + noise_std * torch.randn(shifted.shape, generator=generator)
    return noisy.clamp(-1.0, 1.0)


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024
) -> float:
    """Fraction of ``images`` ``[N, 1, 8, 8]`` whose argmax logit equals ``labels`` ``[N]``."""
    correct = 0
    for i in range(0, images.shape[0], batch):
        logits = model(images[i : i + batch])
        correct += int((logits.argmax(dim=1) == labels[i : i + batch]).sum())
    return correct / max(images.shape[0], 1)


def train_classifier(
    steps: int = 1500,
    batch: int = 128,
    seed: int = 0,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    augmentation: bool = True,
) -> tuple[DigitsClassifier, float]:
    """Train a :class:`DigitsClassifier` on the train split of :func:`stepdistill.data.digits.split`
    (seed 0) with AdamW and a cosine learning-rate decay.

    Returns:
        the model in eval mode, and its accuracy on the held-out split.
    """
    data = DigitsData("train")
    test = DigitsData("test")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    model.train()
    for _ in range(steps):
        x, y = data.sample(batch, generator)
        if augmentation:
            x = augment(x, generator)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    return model, accuracy(model, test.images, test.labels)


def save_classifier(
    model: DigitsClassifier, directory: str | Path, metadata: dict | None = None
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture + ``metadata``) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    config = {"_class_name": "DigitsClassifier", **model.config, **(metadata or {})}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_classifier(directory: str | Path | None = None) -> DigitsClassifier:
    """Load a classifier written by :func:`save_classifier` (default: the shipped asset), in eval
    mode with gradients off.

    Raises:
        StepdistillError: a file is missing or corrupt; the one-line message names it and the fix.
    """
    directory = Path(directory) if directory is not None else DEFAULT_DIR
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise StepdistillError(f"digits classifier file {path} is missing; {_REBUILD}")
    try:
        config = json.loads(config_path.read_text())
        model = DigitsClassifier(**{k: config[k] for k in _ARCH_KEYS})
    except (ValueError, KeyError, TypeError) as err:
        raise StepdistillError(
            f"digits classifier file {config_path} is corrupt ({type(err).__name__}: {err}); {_REBUILD}"
        ) from err
    try:
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as err:  # safetensors raises its own error types for bad headers
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StepdistillError(
            f"digits classifier file {weights_path} is corrupt ({reason[:200]}); {_REBUILD}"
        ) from err
    model.eval().requires_grad_(False)
    return model


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


def main() -> None:
    """Retrain the shipped classifier and write it to the assets folder."""
    model, acc = train_classifier()
    save_classifier(
        model, DEFAULT_DIR, {"held_out_accuracy": round(acc, 4), "steps": 1500, "seed": 0}
    )
    print(f"held-out accuracy {acc:.4f}; wrote {DEFAULT_DIR}")


if __name__ == "__main__":
    main()
