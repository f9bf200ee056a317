"""Diversity of hybrid sampling on a digits run: ``python scripts/diversity.py run=DIR [out=DIR]
[ks=[0,1,2,3]] [num_samples=1000] [teacher_steps=50] [seed=0] [batch_size=250] [recall_k=3]``.

For each k: ``stepdistill.hybrid.sample_hybrid`` (the run's teacher takes k DDIM steps, the student the
rest), then the within-class diversity and k-NN recall in the digits classifier's feature space
(``stepdistill.eval.diversity``), FID and class accuracy (``DigitsTask.metrics``); the same for the
teacher's own ``teacher_steps``-step samples and for the real digits. Same labels and seed for every row.
Writes ``<out>/diversity.json``, ``<out>/diversity.md`` and ``<out>/samples.png`` (one class, 10 samples a row).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from stepdistill.args import parse_args
from stepdistill.conditioning import Conditioning
from stepdistill.data.digits import load_digits_tensors
from stepdistill.errors import StepdistillError
from stepdistill.eval.digits_fid import digits_features
from stepdistill.eval.diversity import class_diversity, class_knn_recall
from stepdistill.eval.report import image_grid
from stepdistill.eval.run_eval import generate, teacher_sampler
from stepdistill.hybrid import run_teacher, sample_hybrid
from stepdistill.pipelines.few_step import load_run
from stepdistill.workflows.teacher import build_task

KEYS = {"run": "str", "out": "str", "ks": "ints", "num_samples": "int", "teacher_steps": "int", "seed": "int",
        "batch_size": "int", "recall_k": "int", "picture_class": "int"}


def measure(samples, labels, task, real_features, real_labels, recall_k: int) -> dict:
    """Diversity and recall (classifier features), FID and class accuracy of digits ``samples``."""
    features = digits_features(samples)
    return {"diversity": class_diversity(features, labels),
            "recall": class_knn_recall(real_features, real_labels, features, labels, recall_k),
            **task.metrics(samples, labels)}


def main(argv: list[str]) -> Path:
    args = parse_args(argv, KEYS, "scripts/diversity.py")
    run = load_run(args.get("run"))
    task, teacher = build_task(run.config), run_teacher(run.config)
    if task.name != "digits":
        raise StepdistillError(f"scripts/diversity.py measures digits runs; {str(run.path)!r} is a {task.name} run")
    n, seed, bs = args.get("num_samples", 1000), args.get("seed", 0), args.get("batch_size", 250)
    recall_k, steps = args.get("recall_k", 3), args.get("teacher_steps", 50)
    labels = task.eval_labels(n)
    cond = Conditioning.labels(labels, task.null_class)
    real_images, real_labels = load_digits_tensors()
    real_features = digits_features(real_images)
    rows, pictures = [], {}
    for k in args.get("ks", [0, 1, 2, 3]):
        start = time.perf_counter()
        x = sample_hybrid(teacher, run.generator, cond, n, k, seed=seed, batch_size=bs, teacher_grid_steps=steps)
        wall = time.perf_counter() - start
        rows.append({"sampler": f"hybrid k={k}", "teacher_steps": k, "nfe": teacher.nfe(k) + run.generator.steps,
                     **measure(x, labels, task, real_features, real_labels, recall_k), "sampling_wall_s": wall})
        pictures[f"k={k}"] = x
    start = time.perf_counter()
    x = generate(teacher_sampler(teacher, steps, teacher.guidance_scale), task.sample_shape, labels,
                 task.null_class, seed, bs)
    wall = time.perf_counter() - start
    rows.append({"sampler": f"teacher {steps} steps", "teacher_steps": steps, "nfe": teacher.nfe(steps),
                 **measure(x, labels, task, real_features, real_labels, recall_k), "sampling_wall_s": wall})
    pictures[f"teacher {steps}"] = x
    rows.append({"sampler": "real digits (all 1,797)", "teacher_steps": None, "nfe": None,
                 "diversity": class_diversity(real_features, real_labels), "recall": None, "fid": None,
                 "class_accuracy": None, "sampling_wall_s": None})
    out = Path(args.get("out") or run.path / "diversity")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"run": str(run.path), "num_samples": n, "seed": seed, "batch_size": bs, "recall_k": recall_k,
                "teacher_grid_steps": steps, "teacher_guidance_scale": teacher.guidance_scale,
                "student_steps": run.generator.steps, "student_t_max": run.generator.t_max,
                "threads": torch.get_num_threads()}
    (out / "diversity.json").write_text(json.dumps({**settings, "rows": rows}, indent=2) + "\n")
    (out / "diversity.md").write_text(markdown(rows, settings))
    shown = args.get("picture_class", 2)
    image_grid({name: x[labels == shown][:10] for name, x in pictures.items()},
               torch.full((10,), shown), out / "samples.png")
    print(markdown(rows, settings))
    return out


def markdown(rows: list[dict], settings: dict) -> str:
    """A markdown table of ``rows`` (values to 3-4 significant digits; blanks where not applicable)."""
    cols = ["sampler", "nfe", "diversity", "recall", "fid", "class_accuracy", "sampling_wall_s"]
    cell = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"Hybrid sampling on {settings['run']}: {settings['num_samples']} samples, seed {settings['seed']}, "
             f"diversity = mean within-class pairwise distance of classifier features, recall = class-wise "
             f"k-NN recall (k={settings['recall_k']}) against the real digits.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except StepdistillError as err:
        raise SystemExit(f"error: {err}") from None
