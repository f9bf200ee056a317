"""The ``Task`` protocol: every shipped task implements all of it (no caller probes a task), and the
label tasks' ``train_batch`` is their ``batch`` with the labels as conditions."""

from __future__ import annotations

import inspect

import pytest
import torch

from stepdistill.algorithms.agd import AdapterGuidanceDistillation
from stepdistill.algorithms.base import Algorithm
from stepdistill.algorithms.dmd2 import DMD2
from stepdistill.batch import Batch
from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import DigitsData
from stepdistill.data.toy2d import ToyMixture
from stepdistill.eval.tasks import DigitsTask, PromptTask, Toy2DTask
from stepdistill.tasks import Task

MEMBERS = [name for name in dir(Task) if not name.startswith("_")] + list(Task.__annotations__)


def test_the_protocol_lists_the_whole_surface():
    assert set(MEMBERS) == {"name", "primary_metric", "sample_figures", "null_class", "sample_shape", "train_batch",
                            "eval_labels", "metrics", "reference", "save_samples_figure"}


@pytest.mark.parametrize("cls", [Toy2DTask, DigitsTask, PromptTask])
def test_every_task_class_has_every_member(cls):
    missing = [name for name in MEMBERS if not hasattr(cls, name)]
    assert not missing, f"{cls.__name__} lacks {missing}"
    own = inspect.signature(cls.train_batch).parameters
    assert list(own) == ["self", "n", "generator", "rows"]


def test_prompt_task_implements_the_missing_features_as_nothing():
    task = PromptTask.__new__(PromptTask)  # no text encoder needed for the "nothing" members
    assert (task.primary_metric, task.sample_figures, task.null_class, task.sample_shape) == (None, False, None, None)
    assert task.eval_labels(4) is None and task.reference(torch.zeros(2)) is None
    assert task.metrics(torch.zeros(2, 3), torch.zeros(2)) == {}
    assert task.save_samples_figure({}, torch.zeros(2), None) is None


@pytest.mark.parametrize("task", [Toy2DTask(ToyMixture(modes=3, classes=3), num_eval=16), DigitsTask(DigitsData())],
                         ids=["toy2d", "digits"])
def test_label_tasks_are_tasks_and_train_batch_is_batch_with_label_conditions(task):
    assert isinstance(task, Task) and task.sample_figures and task.primary_metric is not None
    rows = slice(2, 5)
    batch = task.train_batch(8, torch.Generator().manual_seed(3), rows)
    x0, labels = task.batch(8, torch.Generator().manual_seed(3))
    expected = Conditioning.labels(labels[rows], task.null_class)
    assert isinstance(batch, Batch) and torch.equal(batch.x0, x0[rows])
    assert torch.equal(batch.cond.class_labels, expected.class_labels)


def test_only_agd_trains_on_trajectories():
    assert Algorithm.trains_on_trajectories is False and DMD2.trains_on_trajectories is False
    assert AdapterGuidanceDistillation.trains_on_trajectories is True
