"""``stepdistill teacher train|eval``: build and measure the embedded teachers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stepdistill.config import compose
from stepdistill.workflows.teacher import evaluate, train


def run_train(overrides: Sequence[str]) -> Path:
    return train(compose("teacher", overrides))


def run_eval(overrides: Sequence[str]) -> dict:
    return evaluate(compose("teacher", overrides))
