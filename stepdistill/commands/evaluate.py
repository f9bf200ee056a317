"""``stepdistill eval run=DIR [steps=K] [num_samples=N] [teacher_steps=50] [batch_size=256] [noise_seeds=[0,1,2,3]]``.

Measures a run's student and its teacher with the same code, labels and sample count and writes
``<run>/metrics.json`` and ``<run>/report.md`` (see ``stepdistill.eval.run_eval``); with ``noise_seeds``
every metric is the mean over one evaluation per seed (each seed's value kept in metrics.json); without
it, the run config's ``evaluate.noise_seeds`` (the digits experiments: 0-3), else seed 0 alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stepdistill.args import parse_args
from stepdistill.pipelines import load_run
from stepdistill.workflows.evaluate import evaluate_run

KEYS = {"run": "str", "steps": "int", "num_samples": "int", "teacher_steps": "int", "batch_size": "int",
        "seed": "int", "noise_seeds": "ints"}


def run(overrides: Sequence[str]) -> dict:
    args = parse_args(overrides, KEYS, "eval")
    student = load_run(args.pop("run", None))
    student.generator.to("cuda" if torch.cuda.is_available() else "cpu")
    if "noise_seeds" not in args:  # the run's own protocol (digits: seeds 0-3)
        args["noise_seeds"] = (student.config.get("evaluate") or {}).get("noise_seeds")
    return evaluate_run(student.path, student.generator, student.config, **args)
