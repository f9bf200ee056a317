"""The ``Task`` protocol: everything the trainer, its callbacks and the evaluation ask of a dataset.

A task wraps a dataset object and gives one explicit surface: training batches, the labels to
generate for, the metrics, a reference row and a picture of samples. Every task implements all of it;
a task without a feature implements it as "nothing" (no metrics: ``primary_metric = None`` and
``metrics`` returns ``{}``; no sample figures: ``sample_figures = False``, ``eval_labels`` returns
None and ``save_samples_figure`` draws nothing), so no caller probes a task with ``hasattr``.

The concrete tasks (``Toy2DTask``, ``DigitsTask``, ``PromptTask``) are in ``stepdistill.eval.tasks``:
their metrics and figures come from the evaluation layer above this one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from stepdistill.batch import Batch


@runtime_checkable
class Task(Protocol):
    """What a dataset needs to be trained on, sampled and measured.

    Attributes:
        name: the task's name (``toy2d``, ``digits``, ``prompts``).
        primary_metric: the metric runs are compared by, or None for a task without metrics.
        sample_figures: whether ``save_samples_figure`` draws anything (the trainer's sample grids).
    """

    name: str
    primary_metric: str | None
    sample_figures: bool

    @property
    def null_class(self) -> int | None:
        """The label of the unconditional (CFG null) class, or None without class labels."""
        ...

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample, or None where the task does not know it (the pipeline does)."""
        ...

    def train_batch(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> Batch:
        """Rows ``rows`` of a global training batch of ``n``, drawn with ``generator`` (the same on
        every process)."""
        ...

    def eval_labels(self, n: int | None = None) -> Tensor | None:
        """The ``n`` (default: the task's evaluation count) labels to generate for, or None."""
        ...

    def metrics(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        """The metrics of ``samples`` generated for ``labels`` (``{}`` without metrics)."""
        ...

    def reference(self, labels: Tensor) -> dict[str, float] | None:
        """The metrics of the real data itself (a row to compare with), or None."""
        ...

    def save_samples_figure(self, rows: dict[str, Tensor], labels: Tensor, path: Path) -> None:
        """A picture of sample rows (label -> samples) at ``path`` (nothing without figures)."""
        ...
