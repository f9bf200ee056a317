"""``stepdistill bench quality output_dir=DIR [dataset=toy2d|digits] [budget_s=S] ...``: every shipped
algorithm under the same wall-time budget, against its teacher.

For each dataset (toy2d, then digits, unless ``dataset=`` names one) and each experiment:

1. a probe (:mod:`stepdistill.bench.budget`) measures seconds per training iteration in this process;
2. the run trains ``floor(budget_s / s_per_it)`` iterations through the normal train entry point into
   ``output_dir/runs/<dataset>_<name>`` (config.yaml, checkpoints, student, train.json as usual), with
   the schedules tied to ``trainer.max_steps`` scaled to match, and ``trainer.max_wall_s = budget_s``
   so that a machine slowing down never gives a run more than the budget;
3. the normal evaluation writes its metrics.json: the student's metric and the teacher's at 50 steps,
   same code, labels and noise.

Then the teacher's metric-vs-NFE curve (``teacher_steps``, the dataset's teacher config: CFG, hence
2 NFE per step, when its ``guidance_scale`` is not 1) comes from the same evaluation code and cache.

Keys:
    output_dir: where bench_quality.json / .md / .png and ``runs/`` go (required).
    dataset: toy2d | digits (default: both, in turn).
    experiments: e.g. ``[toy2d/dmd2,toy2d/lcm]`` or bare names (``[dmd2,lcm]``: on each dataset that has
        them). Default: ``bench.common.default_experiments`` (the shipped ones without the variants
        such as ``dmd2_long``, ``dmd2_4step``, ``sid_4step``, which run only when listed).
    budget_s: training wall time per experiment (default 120 on toy2d, 900 on digits); the AGD
        teacher-trajectory collection and the evaluation are outside it.
    teacher_steps: the teacher curve's step counts (default [1,2,4,8,16,25,50]).
    num_samples: evaluation samples (default: the task's).
    resume: reuse the runs in output_dir that finished with the same budget and sample count.
    probe_iterations: timed iterations of the probe (default 18, after 6 warm-up ones).
    batch_size: the evaluation's batch size (default 256, as ``evaluate.batch_size``); it sets the batch
        of the samples/s measurements in each run's metrics.json, not the metrics.

Rows: ``dataset, experiment, algorithm, metric, value, teacher_value`` (50 steps), ``ratio`` (value /
teacher_value), ``steps, nfe`` (the student's), ``iterations, wall_s`` (train.json), ``budget_s``, plus
``s_per_it`` (the probe) and ``teacher_guidance_scale`` (AGD is measured against its CFG teacher).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from stepdistill.bench.budget import PROBE_ITERATIONS, budget_steps, fit_to_budget, probe
from stepdistill.bench.common import (
    DATASETS,
    default_experiments,
    markdown_table,
    parse_bench_args,
    shipped_experiments,
    write_suite,
)
from stepdistill.bench.provenance import config_sha
from stepdistill.config import compose, compose_train
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.eval.report import pyplot
from stepdistill.eval.run_eval import check_noise_seeds, teacher_row
from stepdistill.eval.tasks import DigitsTask, Toy2DTask
from stepdistill.roles import Teacher
from stepdistill.workflows.teacher import build_task
from stepdistill.workflows.train import train

KEYS = {"output_dir": "str", "dataset": "str", "experiments": "strs", "budget_s": "float",
        "teacher_steps": "ints", "num_samples": "int", "resume": "bool", "probe_iterations": "int", "batch_size": "int"}
DEFAULT_BUDGET_S = {"toy2d": 120.0, "digits": 900.0}
DEFAULT_TEACHER_STEPS = [1, 2, 4, 8, 16, 25, 50]
#: the teacher every student is compared with runs this many steps
TEACHER_STEPS = 50
#: the evaluation's seed and default batch size (train.yaml's evaluate.batch_size): the teacher cache
#: (keyed by teacher, labels, steps, scale and seed) is shared with every run's evaluation
EVAL_SEED, EVAL_BATCH_SIZE = 0, 256
RECORD = "bench_budget.json"
COLUMNS = ["experiment", "algorithm", "steps", "nfe", "value", "teacher_value", "ratio", "iterations",
           "wall_s", "budget_s"]


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """Run the suite; returns the payload written to ``bench_quality.json``."""
    args = parse_bench_args(overrides, KEYS, "quality")
    plan = plan_experiments(args.get("dataset"), args.get("experiments"))
    teacher_steps = args.get("teacher_steps") or DEFAULT_TEACHER_STEPS
    num_samples = args.get("num_samples")
    batch_size = args.get("batch_size", EVAL_BATCH_SIZE)
    if any(k < 1 for k in teacher_steps) or (num_samples is not None and num_samples < 1) \
            or args.get("probe_iterations", 1) < 1 or batch_size < 1:
        raise StepdistillError("teacher_steps, num_samples, probe_iterations and batch_size must be >= 1")
    if args.get("budget_s") is not None and args["budget_s"] <= 0:
        raise StepdistillError(f"budget_s must be > 0, got {args['budget_s']}")
    out = Path(args["output_dir"])
    rows, curves, budgets = [], {}, {}
    for dataset, experiments in plan.items():
        budget = float(args.get("budget_s") or DEFAULT_BUDGET_S[dataset])
        budgets[dataset] = budget
        for experiment in experiments:
            rows.append(run_experiment(experiment, out / "runs" / experiment.replace("/", "_"), budget,
                                       num_samples, args.get("resume", False),
                                       args.get("probe_iterations", PROBE_ITERATIONS), batch_size))
            gc.collect()
        curves[dataset] = teacher_curve(dataset, teacher_steps, num_samples, batch_size)
    payload = {"suite": "quality", "rows": rows, "teacher_curves": curves, "budget_s": budgets,
               "teacher_steps": TEACHER_STEPS, "num_samples": num_samples}
    write_suite(out, "quality", payload, render_markdown(rows, curves), plot=lambda p: plot(rows, curves, p),
                title="Every algorithm under the same training wall-time budget; ratio = student / teacher "
                      f"at {TEACHER_STEPS} steps (lower metric is better).")
    return payload


def plan_experiments(dataset: str | None, experiments: list[str] | None) -> dict[str, list[str]]:
    """``{dataset: [<dataset>/<name>, ...]}`` in run order; unknown experiments are a one-line error."""
    datasets = [dataset] if dataset else list(DATASETS)
    shipped = {d: shipped_experiments(d) for d in datasets}
    if not experiments:
        return {d: default_experiments(d) for d in datasets}
    plan: dict[str, list[str]] = {d: [] for d in datasets}
    for name in experiments:
        if "/" in name:
            candidates = [name] if name.split("/", 1)[0] in shipped and name in shipped[name.split("/", 1)[0]] else []
        else:
            candidates = [f"{d}/{name}" for d in datasets if f"{d}/{name}" in shipped[d]]
        if not candidates:
            allowed = ", ".join(e for d in datasets for e in shipped[d])
            raise StepdistillError(f"unknown experiment {name!r} for `stepdistill bench quality`; allowed: {allowed}")
        for c in candidates:
            if c not in plan[c.split("/", 1)[0]]:
                plan[c.split("/", 1)[0]].append(c)
    return {d: names for d, names in plan.items() if names}


def run_experiment(experiment: str, run_dir: Path, budget_s: float, num_samples: int | None,
                   resume: bool, probe_iterations: int = PROBE_ITERATIONS,
                   batch_size: int = EVAL_BATCH_SIZE) -> dict[str, Any]:
    """Probe, train within ``budget_s`` and evaluate one experiment (or reuse its finished run)."""
    record = _finished(run_dir, budget_s, num_samples) if resume else None
    if record is None:
        overrides = [f"experiment={experiment}", f"output_dir={run_dir}", "overwrite=true", "evaluate.enabled=true",
                     f"evaluate.teacher_steps={TEACHER_STEPS}", f"evaluate.batch_size={batch_size}"]
        if num_samples is not None:
            overrides.append(f"evaluate.num_samples={num_samples}")
        cfg = compose_train(overrides)
        measured = probe(cfg, iterations=probe_iterations)
        gc.collect()
        max_steps = budget_steps(budget_s, measured.s_per_it)
        changed = fit_to_budget(cfg, max_steps)
        cfg.trainer.max_wall_s = float(budget_s)  # and never past the budget if the machine slows down
        print(f"bench quality: {experiment}: {measured.s_per_it:.4g} s/iteration -> {max_steps} iterations "
              f"for {budget_s:g} s")
        (run_dir / RECORD).unlink(missing_ok=True)  # a run that fails leaves no record to resume from
        train(cfg)
        record = {"budget_s": budget_s, "num_samples": num_samples, "s_per_it": measured.s_per_it,
                  "probe_iterations": measured.iterations, "probe_warmup": measured.warmup,
                  "setup_s": measured.setup_s, "max_steps": max_steps,
                  "changed": {k: list(v) for k, v in changed.items()}}
        (run_dir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return row(experiment, run_dir, record)


def _finished(run_dir: Path, budget_s: float, num_samples: int | None) -> dict[str, Any] | None:
    """The budget record of a finished run with the same budget and sample count, else None."""
    files = [run_dir / n for n in (RECORD, "metrics.json", "train.json")]
    if not all(f.is_file() for f in files):
        return None
    record = json.loads(files[0].read_text())
    train = json.loads(files[2].read_text())
    same = record.get("budget_s") == budget_s and record.get("num_samples") == num_samples
    return record if same and 0 < train.get("iterations", 0) <= record.get("max_steps", 0) else None


def row(experiment: str, run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The suite's row of a finished run, from its metrics.json, train.json and budget record."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = json.loads((run_dir / "train.json").read_text())
    key = _metric_name(metrics["dataset"])
    value, teacher_value = float(metrics["student"]["metrics"][key]), float(metrics["teacher"]["metrics"][key])
    return {"dataset": metrics["dataset"], "experiment": experiment, "algorithm": metrics["algorithm"],
            "metric": key, "value": value, "teacher_value": teacher_value, "ratio": value / teacher_value,
            "steps": metrics["student"]["steps"], "nfe": metrics["student"]["nfe"],
            "iterations": train["iterations"], "wall_s": train["wall_s"], "budget_s": record["budget_s"],
            "s_per_it": record["s_per_it"], "teacher_guidance_scale": metrics["teacher"]["guidance_scale"],
            "config_sha": config_sha(experiment)}


def _metric_name(dataset: str) -> str:
    return {t.name: t.primary_metric for t in (Toy2DTask, DigitsTask)}[dataset]


def teacher_curve(dataset: str, steps: Sequence[int], num_samples: int | None,
                  batch_size: int = EVAL_BATCH_SIZE) -> dict[str, Any]:
    """The dataset's teacher (``configs/teacher_recipe/<dataset>.yaml``) at each of ``steps``: its metric and
    NFE, through ``run_eval.teacher_row`` (the evaluation's code, labels, noise and cache)."""
    cfg = compose("teacher", [f"dataset={dataset}"])
    task = build_task(cfg)
    scale = float(cfg.teacher.guidance_scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the runs' evaluation puts the teacher
    teacher = Teacher(load_denoiser(cfg.teacher.path), scale).to(device)
    labels = task.eval_labels(num_samples)
    # the noise seeds of the runs' own evaluation (digits: 0-3), so the curve meets their teacher row
    seeds = check_noise_seeds((cfg.get("evaluate") or {}).get("noise_seeds"), EVAL_SEED)
    points = []
    with torch.no_grad():
        for k in steps:
            r = teacher_row(teacher, task, labels, int(k), scale, seeds, batch_size, device)
            points.append({"steps": int(k), "nfe": r["nfe"], "value": float(r["metrics"][task.primary_metric])})
    return {"metric": task.primary_metric, "guidance_scale": scale, "num_samples": len(labels), "points": points}


def render_markdown(rows: Sequence[dict[str, Any]], curves: dict[str, dict[str, Any]]) -> str:
    """One section per dataset: the students' table, then the teacher's curve."""
    parts = []
    for dataset, curve in curves.items():
        mine = [r for r in rows if r["dataset"] == dataset]
        budget = mine[0]["budget_s"] if mine else None
        parts.append(f"## {dataset}: {curve['metric']}, budget {budget:g} s of training per experiment\n\n"
                     + markdown_table(mine, COLUMNS)
                     + f"\nteacher {curve['metric']} vs steps (guidance scale {curve['guidance_scale']:g}):\n\n"
                     + markdown_table(curve["points"], ["steps", "nfe", "value"]))
    return "\n".join(parts)


def plot(rows: Sequence[dict[str, Any]], curves: dict[str, dict[str, Any]], path: Path) -> None:
    """Per dataset a panel: metric vs NFE (log x), the teacher's curve and each student as a point."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (dataset, curve) in zip(axes[0], curves.items(), strict=True):
        pts = curve["points"]
        ax.plot([p["nfe"] for p in pts], [p["value"] for p in pts], "o-", color="black",
                label=f"teacher (CFG {curve['guidance_scale']:g})")
        values = [p["value"] for p in pts]
        for i, r in enumerate(r for r in rows if r["dataset"] == dataset):
            ax.plot([r["nfe"]], [r["value"]], marker="*^sDvP<>"[i % 8], markersize=12, linestyle="none",
                    label=f"{r['experiment'].split('/', 1)[1]} ({r['iterations']} it{_versus(r, curve)})")
            values.append(r["value"])
        ax.set_xscale("log")
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("NFE per sample")
        ax.set_ylabel(curve["metric"])
        budget = next((r["budget_s"] for r in rows if r["dataset"] == dataset), None)
        ax.set_title(f"{dataset}" + (f", {budget:g} s budget" if budget else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versus(row: dict[str, Any], curve: dict[str, Any]) -> str:
    """``, vs CFG 3`` for a student measured against another teacher than the curve's (AGD)."""
    scale = row.get("teacher_guidance_scale")
    return f", vs CFG {scale:g}" if scale is not None and scale != curve["guidance_scale"] else ""
