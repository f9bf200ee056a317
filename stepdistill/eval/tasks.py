"""Evaluation tasks: what a dataset needs to be trained on, sampled and measured.

A task wraps a dataset object (``ToyMixture``, ``DigitsData``, prompts) and implements the whole
``stepdistill.tasks.Task`` protocol: training batches, the labels to generate for, the metrics, a
reference row and a picture of samples (a task without a feature implements it as "nothing").
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from torch import Tensor

from stepdistill.batch import Batch
from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import DigitsData
from stepdistill.data.images import ImageCaptionData, VaeLatents
from stepdistill.data.prompts import PromptEncoder, pixel_size
from stepdistill.data.toy2d import ToyMixture
from stepdistill.errors import StepdistillError
from stepdistill.eval.digits_fid import digits_metrics
from stepdistill.eval.report import image_grid, scatter_panels
from stepdistill.eval.toy_metrics import swd, toy_metrics


class Toy2DTask:
    """toy2d: metrics against fresh samples of the true mixture (swd, mmd, coverage, accuracy).

    A sliced W2 between two finite sets is noisy (mass moving between far-apart modes of one class:
    true-vs-true swd at n = 4,000 on the default mixture has mean 0.086, std 0.019 over seeds), so
    swd is averaged over ``draws`` fresh true sets and the reference row's over ``2 * draws``
    independent true-vs-true pairs (the other metrics barely move between true sets).

    Args:
        data: the mixture.
        num_eval: samples per evaluation.
        seed: seed of the evaluation labels and reference sets.
        draws: fresh true sets each metric is averaged over.
    """

    name = "toy2d"
    primary_metric = "swd"
    sample_figures = True

    def __init__(self, data: ToyMixture, num_eval: int = 4000, seed: int = 0, draws: int = 4) -> None:
        self.data, self.num_eval, self.seed, self.draws = data, int(num_eval), int(seed), int(draws)

    @property
    def null_class(self) -> int:
        return self.data.null_class

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (2,)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        x, labels, _ = self.data.sample(n, generator)
        return x, labels

    def train_batch(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> Batch:
        """Rows ``rows`` of a global batch of ``n`` drawn with ``generator``, labels as conditions."""
        x0, labels = self.batch(n, generator)
        return Batch(cond=Conditioning.labels(labels[rows], self.null_class), x0=x0[rows])

    def eval_labels(self, n: int | None = None) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return self.data.sample(self.num_eval if n is None else n, g)[1]

    def metrics(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        """All metrics against one fresh true set; swd averaged over ``draws`` of them."""
        return self._averaged(lambda g: samples, labels, self.seed + 1, self.draws)

    def reference(self, labels: Tensor) -> dict[str, float] | None:
        """True vs true, averaged (swd) over ``2 * draws`` pairs."""
        return self._averaged(lambda g: self.data.sample_class(labels, g), labels, self.seed + 1000,
                              2 * self.draws)

    def _averaged(self, first_set, labels: Tensor, seed: int, draws: int) -> dict[str, float]:
        # mmd, coverage and accuracy barely move between true sets; swd does, so only it is averaged
        g = torch.Generator().manual_seed(seed)
        out = toy_metrics(first_set(g), labels, self.data, g)
        swds = [out["swd"]]
        for k in range(1, draws):
            g = torch.Generator().manual_seed(seed + k)
            x = first_set(g)
            swds.append(swd(x, self.data.sample_class(labels, g), 256, g))
        return {**out, "swd": sum(swds) / len(swds)}

    def save_samples_figure(self, rows: dict[str, Tensor], labels: Tensor, path: Path) -> None:
        scatter_panels(rows, labels, path, centers=self.data.centers)


class DigitsTask:
    """digits: FID in the shipped classifier's feature space against all 1,797 digits, and accuracy.

    Args:
        data: the digits.
        num_eval: generated samples per evaluation (default: as many as real digits).
        seed: seed of the evaluation labels.
    """

    name = "digits"
    primary_metric = "fid"
    sample_figures = True

    def __init__(self, data: DigitsData, num_eval: int = 1797, seed: int = 0) -> None:
        self.data, self.num_eval, self.seed = data, int(num_eval), int(seed)

    @property
    def null_class(self) -> int:
        return self.data.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, 8, 8)

    def batch(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self.data.sample(n, generator)

    def train_batch(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> Batch:
        """Rows ``rows`` of a global batch of ``n`` drawn with ``generator``, labels as conditions."""
        x0, labels = self.batch(n, generator)
        return Batch(cond=Conditioning.labels(labels[rows], self.null_class), x0=x0[rows])

    def eval_labels(self, n: int | None = None) -> Tensor:
        """The real digits' labels (a fixed permutation of them, cycled), so class frequencies match."""
        n = self.num_eval if n is None else n
        g = torch.Generator().manual_seed(self.seed)
        labels = self.data.labels[torch.randperm(len(self.data), generator=g)]
        return labels.repeat((n + len(labels) - 1) // len(labels))[:n]

    def metrics(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        return digits_metrics(samples, labels)

    def reference(self, labels: Tensor) -> dict[str, float] | None:
        return None

    def save_samples_figure(self, rows: dict[str, Tensor], labels: Tensor, path: Path) -> None:
        image_grid(rows, labels, path)


class PromptTask:
    """Text-to-image distillation from prompts: conditions, and real latents when the data has images.

    Its training batches are ``Batch(cond=<the prompts' embeddings>, x0=None)`` for prompts alone
    (``PromptData``: data-free DMD2 / SiD), encoded as the teacher pipeline's ``encode_prompt`` does
    (``PromptEncoder``) on this process's device; with captioned images (``ImageCaptionData``: the GAN
    terms, f-distill) ``x0`` holds the images encoded by the pipeline's VAE (``VaeLatents``). With
    ``data.cache`` (``stepdistill cache``) both come from the cache, and no encoder or VAE is loaded. It has no
    metrics of its own: FID / CLIP score on COCO-style prompt sets belong to the evaluation scripts,
    so its experiments set ``evaluate.enabled: false``; sample with ``stepdistill sample run=DIR``.

    Args:
        data: the training prompts (``PromptData``) or captioned images (``ImageCaptionData``).
        text_encoder: the local diffusers pipeline directory whose tokenizers / text encoders (and
            VAE, for images) to use (the teacher's, ``${teacher.path}``).
        negative_prompt: the null condition for CFG ("" = the pipeline's default).
    """

    name = "prompts"
    primary_metric = None
    sample_figures = False

    def __init__(self, data, text_encoder: str, negative_prompt: str = "") -> None:
        self.data = data
        self.negative_prompt = str(negative_prompt)
        cache = getattr(data, "cache", None)  # data.cache: `stepdistill cache`'s rows, no encoder loaded
        self.encoder = (PromptEncoder.from_pretrained(text_encoder) if cache is None
                        else cache.prompt_encoder(text_encoder, self.negative_prompt))
        self.latents = None
        if isinstance(data, ImageCaptionData):
            _check_resolution(data.resolution, text_encoder)
            self.latents = (VaeLatents.from_pretrained(text_encoder) if cache is None
                            else cache.latent_encoder(text_encoder))
        self._placed = False

    @property
    def null_class(self) -> None:
        """None: prompts, no class labels (the null condition is ``negative_prompt``)."""
        return None

    @property
    def sample_shape(self) -> None:
        """None: the teacher pipeline knows the latent shape, the task does not."""
        return None

    def train_batch(self, n: int, generator: torch.Generator, rows: slice = slice(None)):
        """Rows ``rows`` of the global batch for one step: ``n`` prompts (and images) drawn with
        ``generator``, the same on every process; only the kept rows are read and encoded."""
        if not self._placed:  # each process encodes on its own accelerator
            self.encoder.to(PartialState().device)
            if self.latents is not None:
                self.latents.to(PartialState().device)
            self._placed = True
        if self.latents is None:
            prompts = self.data.draw(n, generator)[rows]
            return Batch(cond=self.encoder.encode(prompts, self.negative_prompt), x0=None)
        prompts, pixels = self.data.draw(n, generator, rows)
        return Batch(cond=self.encoder.encode(prompts, self.negative_prompt), x0=self.latents(pixels))

    def eval_labels(self, n: int | None = None) -> None:
        """None: no labels to generate for (sample from prompts with ``stepdistill sample``)."""
        return None

    def metrics(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        """No metrics of its own: ``{}``."""
        return {}

    def reference(self, labels: Tensor) -> None:
        return None

    def save_samples_figure(self, rows: dict[str, Tensor], labels: Tensor, path: Path) -> None:
        """No sample figures (``sample_figures = False``): draws nothing."""


def _check_resolution(resolution: int, pipeline: str) -> None:
    """Real images must come at the teacher's pixel size, or their latents cannot meet its samples."""
    expected = pixel_size(pipeline)
    if expected is not None and resolution != expected:
        raise StepdistillError(f"data.resolution={resolution} but the teacher in {pipeline!r} works on "
                               f"{expected}-pixel images: set data.resolution={expected}")
