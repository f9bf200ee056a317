"""A run's student and its teacher measured with the same code, labels and sample count:
``<run>/metrics.json`` and ``<run>/report.md`` (see ``stepdistill.eval.run_eval``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from stepdistill.denoisers.loading import load_denoiser, teacher_dtype
from stepdistill.errors import StepdistillError
from stepdistill.eval.run_eval import evaluate_student
from stepdistill.eval.run_report import write_metrics, write_report
from stepdistill.roles import Teacher
from stepdistill.workflows.teacher import build_task


def evaluate_run(run_dir: Path, generator, cfg, *, steps: int | None = None, num_samples: int | None = None,
                 teacher_steps: int = 50, batch_size: int = 256, seed: int = 0,
                 noise_seeds: Sequence[int] | None = None) -> dict:
    """Evaluate ``generator`` (the run's student) and write metrics.json and report.md into ``run_dir``."""
    task = build_task(cfg)
    if task.primary_metric is None:
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
