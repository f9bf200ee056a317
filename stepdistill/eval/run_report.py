"""``<run>/metrics.json`` and ``<run>/report.md`` (with its pictures) from an evaluation result."""

from __future__ import annotations

import json
from pathlib import Path

from stepdistill.eval.report import markdown_table, plot_metric_vs_nfe, pyplot


def write_metrics(run_dir: Path, result: dict, *, experiment: str, algorithm: str, dataset: str,
                  train: dict | None) -> dict:
    """The issue-3 schema: experiment, algorithm, dataset, student, teacher, reference, train."""
    metrics = {"experiment": experiment, "algorithm": algorithm, "dataset": dataset,
               "student": result["student"], "teacher": result["teacher"],
               "reference": result["reference"], "train": train or {},
               "teacher_curve": result["teacher_curve"], "speed": result.get("speed")}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def write_report(run_dir: Path, metrics: dict, result: dict, task) -> Path:
    """report.md: metrics table, teacher-vs-student samples, metric-vs-NFE plot, loss curves."""
    key = task.primary_metric
    rows = [{"model": f"student ({metrics['algorithm']})", "steps": metrics["student"]["steps"],
             "nfe": metrics["student"]["nfe"], **metrics["student"]["metrics"],
             "samples/s": metrics["student"]["samples_per_s"]},
            {"model": "teacher", "steps": metrics["teacher"]["steps"], "nfe": metrics["teacher"]["nfe"],
             **metrics["teacher"]["metrics"], "samples/s": metrics["teacher"]["samples_per_s"]}]
    if metrics.get("reference"):
        rows.append({"model": "reference (true vs true)", **metrics["reference"]})
    columns = ["model", "steps", "nfe", *metrics["student"]["metrics"], "samples/s"]
    task.save_samples_figure(result["pictures"], result["picture_labels"], run_dir / "samples_teacher_vs_student.png")
    curve = metrics["teacher_curve"]
    plot_metric_vs_nfe({"teacher": ([r["nfe"] for r in curve], [r["metrics"][key] for r in curve]),
                        f"student ({metrics['algorithm']})": ([metrics["student"]["nfe"]],
                                                              [metrics["student"]["metrics"][key]])},
                       key, run_dir / f"{key}_vs_nfe.png",
                       reference=(metrics.get("reference") or {}).get(key), title=metrics["experiment"])
    has_losses = plot_phase_losses(run_dir / "logs.jsonl", run_dir / "losses.png")
    ratio = metrics["student"]["metrics"][key] / max(metrics["teacher"]["metrics"][key], 1e-12)
    train = metrics.get("train") or {}
    text = [f"# {metrics['experiment']}", "",
            f"{metrics['algorithm']} student, {metrics['student']['steps']} step(s), vs the teacher at "
            f"{metrics['teacher']['steps']} steps (CFG {metrics['teacher']['guidance_scale']}): "
            f"{key} ratio student / teacher = **{ratio:.3g}**.", "",
            *_seed_lines(metrics, key),
            markdown_table(rows, columns),
            f"Training: {train.get('iterations', '?')} iterations in {train.get('wall_s', '?')} s, "
            f"{train.get('skipped_nonfinite', 0)} non-finite steps skipped.", "",
            *_speed_lines(metrics.get("speed")),
            "![samples](samples_teacher_vs_student.png)", "", f"![{key} vs NFE]({key}_vs_nfe.png)", ""]
    if has_losses:
        text += ["![losses](losses.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(text))
    return path


def _seed_lines(metrics: dict, key: str) -> list[str]:
    """With several noise seeds: what the means are over, and each seed's value."""
    seeds = metrics["student"].get("noise_seeds")
    if not seeds:
        return []
    values = lambda row: ", ".join(f"{v:.4g}" for v in row["metrics_per_seed"][key])  # noqa: E731
    return [f"Metrics are means over noise seeds {seeds}; {key} per seed: student {values(metrics['student'])}, "
            f"teacher {values(metrics['teacher'])}.", ""]


def plot_phase_losses(log_file: Path, path: Path) -> bool:
    """One curve per phase from ``logs.jsonl`` (rows with "step", "phase", "loss")."""
    if not log_file.is_file():
        return False
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in log_file.read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "phase" in row:
            steps, values = series.setdefault(row["phase"], ([], []))
            steps.append(row["step"])
            values.append(row["loss"])
    if not series:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (phase, (steps, values)) in zip(axes[0], sorted(series.items()), strict=True):
        ax.plot(steps, values, linewidth=0.8)
        ax.set_title(f"{phase} loss")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _speed_lines(speed: dict | None) -> list[str]:
    if not speed:
        return []
    cfg = speed["teacher_cfg"]
    return [f"Sampling speed (batch {speed['batch_size']}, {speed['device']}): the student is "
            f"**{speed['speedup']}x** faster than the teacher at {cfg['steps']} steps with CFG {cfg['guidance_scale']} "
            f"({cfg['samples_per_s']} samples/s, NFE {cfg['nfe']}); NFE ratio {speed['nfe_ratio']:g}, "
            f"speedup / NFE ratio = **{speed['speedup_over_nfe_ratio']}**.", ""]
