"""``stepdistill train experiment=<dataset>/<name> output_dir=DIR [key=value ...]``: distil a teacher.

Composes ``configs/train.yaml`` with an experiment, builds task, teacher, generator, critic and
algorithm from their ``_target_`` nodes, and runs the ``Trainer``. Everything is built and checked
before anything is written, and a directory that already holds a run is reused only with
``trainer.resume=...`` or ``overwrite=true``.

Run directory: ``config.yaml`` (resolved), ``checkpoints/checkpoint-<step>/``, ``logs.jsonl``,
``samples/step-XXXXXX.png``, ``student/`` (diffusers format), ``train.json``, and ``wandb/`` or
``tensorboard/`` with those loggers.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepdistill.config import compose_train
from stepdistill.workflows.train import TrainResult, train


def run(overrides: Sequence[str]) -> TrainResult:
    return train(compose_train(overrides))
