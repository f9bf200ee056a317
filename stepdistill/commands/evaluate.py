"""``stepdistill eval run=DIR [steps=K] [num_samples=N] [teacher_steps=50] [batch_size=256] [noise_seeds=[0,1,2,3]]``.

Measures a run's student and its teacher with the same code, labels and sample count and writes
``<run>/metrics.json`` and ``<run>/report.md`` (see ``stepdistill.eval.run_eval``); with ``noise_seeds``
every metric is the mean over one evaluation per seed (each seed's value kept in metrics.json); without
it, the run config's ``evaluate.noise_seeds`` (the digits experiments: 0-3), else seed 0 alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from stepdistill.commands.sample import parse_args
from stepdistill.denoisers.loading import load_denoiser, teacher_dtype
from stepdistill.errors import StepdistillError

KEYS = {"run": "str", "steps": "int", "num_samples": "int", "teacher_steps": "int", "batch_size": "int",
        "seed": "int", "noise_seeds": "ints"}


def evaluate_run(run_dir: Path, generator, cfg, *, steps: int | None = None, num_samples: int | None = None,
                 teacher_steps: int = 50, batch_size: int = 256, seed: int = 0,
                 noise_seeds: Sequence[int] | None = None) -> dict:
    """Evaluate ``generator`` (the run's student) and write metrics.json and report.md into ``run_dir``."""
    from stepdistill.commands.teacher import build_task
    from stepdistill.eval.run_eval import evaluate_student
    from stepdistill.eval.run_report import write_metrics, write_report
    from stepdistill.roles import Teacher

    task = build_task(cfg)
    if getattr(task, "primary_metric", None) is None:
        raise StepdistillError(f"the {task.name!r} task has no metrics of its own: nothing to evaluate "
                               "(sample with `stepdistill sample run=DIR`)")
    teacher = Teacher(load_denoiser(cfg.teacher.path, dtype=teacher_dtype(cfg)), cfg.teacher.guidance_scale)
    scale = cfg.algorithm.get("guidance_scale") if cfg.get("algorithm") else None
    result = evaluate_student(generator, teacher, task, steps=steps or generator.steps,
                              teacher_steps=teacher_steps, guidance_scale=scale, num_samples=num_samples,
                              seed=seed, batch_size=batch_size, noise_seeds=noise_seeds)
    train_file = run_dir / "train.json"
    train = json.loads(train_file.read_text()) if train_file.is_file() else None
    metrics = write_metrics(run_dir, result, experiment=str(cfg.get("experiment_name") or run_dir.name),
                            algorithm=str(cfg.algorithm._target_).rsplit(".", 1)[-1], dataset=task.name,
                            train=train)
    report = write_report(run_dir, metrics, result, task)
    key = task.primary_metric
    seeds = metrics["student"].get("noise_seeds")
    over = f" (means over noise seeds {seeds})" if seeds else ""
    print(f"student {key} {metrics['student']['metrics'][key]:.4g} vs teacher "
          f"{metrics['teacher']['metrics'][key]:.4g} ({metrics['teacher']['steps']} steps){over}; report: {report}")
    return metrics


def run(overrides: Sequence[str]) -> dict:
    from stepdistill.pipelines import load_run

    args = parse_args(overrides, KEYS, "eval")
    student = load_run(args.pop("run", None))
    student.generator.to("cuda" if torch.cuda.is_available() else "cpu")
    if "noise_seeds" not in args:  # the run's own protocol (digits: seeds 0-3)
        args["noise_seeds"] = (student.config.get("evaluate") or {}).get("noise_seeds")
    return evaluate_run(student.path, student.generator, student.config, **args)
