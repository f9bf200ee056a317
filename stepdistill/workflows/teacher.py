"""The embedded teachers, built and measured from a composed ``teacher.yaml`` config
(``stepdistill teacher train|eval``, the benchmarks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from stepdistill.config import instantiate, to_container
from stepdistill.denoisers.loading import load_denoiser, model_subfolder, wrap_backbone
from stepdistill.errors import StepdistillError
from stepdistill.eval.report import markdown_table, plot_losses, plot_metric_vs_nfe
from stepdistill.eval.run_eval import generate, teacher_sampler
from stepdistill.roles import Teacher
from stepdistill.schedules import NoiseSchedule
from stepdistill.training.teacher import train_teacher


def prepare_output_dir(path: str | None, overwrite: bool, marker: str) -> Path:
    """Create ``path``; refuse to touch one that already holds ``marker`` unless ``overwrite``."""
    if not path:
        raise StepdistillError("output_dir is required: add output_dir=DIR")
    out = Path(path)
    if (out / marker).exists() and not overwrite:
        raise StepdistillError(f"{str(out)!r} already holds {marker}; choose another output_dir or "
                               "pass overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    return out


def build_task(cfg: DictConfig):
    return instantiate(cfg.task, data=instantiate(cfg.data))


def train(cfg: DictConfig) -> Path:
    """Train the teacher recipe ``cfg`` (``dataset=``) into ``output_dir`` (a diffusers-format directory)."""
    out = prepare_output_dir(cfg.output_dir, cfg.overwrite, "scheduler")
    task = build_task(cfg)
    backbone = instantiate(cfg.model)
    scheduler = instantiate(cfg.scheduler)
    schedule = NoiseSchedule.from_diffusers(scheduler)
    denoiser = wrap_backbone(backbone, schedule)
    losses: list[float] = []
    start = time.perf_counter()
    ema = train_teacher(denoiser, task.batch, task.null_class, instantiate(cfg.train),
                        on_step=lambda _step, loss: losses.append(loss))
    wall = time.perf_counter() - start
    ema.backbone.save_pretrained(out / model_subfolder(ema.backbone))
    scheduler.save_pretrained(out / "scheduler")
    (out / "training.json").write_text(json.dumps(
        {"dataset": task.name, "steps": len(losses), "wall_s": round(wall, 1),
         "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
         "config": to_container(cfg)}, indent=2))
    plot_losses(losses, out / "loss.png", title=f"{task.name} teacher loss")
    print(f"teacher written to {out} ({len(losses)} steps, {wall:.0f} s)")
    return out


def evaluate(cfg: DictConfig) -> dict:
    """Teacher metrics at several step counts: JSON, markdown table, plot and sample grid."""
    out = prepare_output_dir(cfg.output_dir, True, "")
    task = build_task(cfg)
    teacher = Teacher(load_denoiser(cfg.teacher.path), cfg.teacher.guidance_scale)
    labels = task.eval_labels()
    rows, pictures = [], {}
    for steps in tqdm(list(cfg.steps), desc=f"{task.name} teacher eval"):
        start = time.perf_counter()
        samples = generate(teacher_sampler(teacher, int(steps), cfg.teacher.guidance_scale), task.sample_shape,
                           labels, task.null_class, cfg.seed, batch_size=512)
        speed = len(labels) / (time.perf_counter() - start)
        rows.append({"steps": int(steps), "nfe": teacher.nfe(int(steps)),
                     "guidance_scale": float(cfg.teacher.guidance_scale),
                     "metrics": task.metrics(samples, labels), "samples_per_s": round(speed, 1)})
        pictures[f"{steps} steps"] = samples
        print(f"steps={steps}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[-1]["metrics"].items()))
    result = {"dataset": task.name, "teacher": str(cfg.teacher.path), "num_samples": len(labels),
              "rows": rows}
    reference = task.reference(labels)
    if reference is not None:
        result["reference"] = reference
    _write_eval(out, task, result, pictures, labels)
    return result


def _write_eval(out: Path, task, result: dict, pictures: dict, labels: torch.Tensor) -> None:
    (out / "teacher_metrics.json").write_text(json.dumps(result, indent=2))
    flat = [{"steps": r["steps"], "nfe": r["nfe"], "guidance_scale": r["guidance_scale"], **r["metrics"],
             "samples_per_s": r["samples_per_s"]} for r in result["rows"]]
    columns = ["steps", "nfe", "guidance_scale", *result["rows"][0]["metrics"], "samples_per_s"]
    table = markdown_table(flat, columns)
    if "reference" in result:
        table += "\nreference (true vs true): " + ", ".join(
            f"{k}={v:.4g}" for k, v in result["reference"].items()) + "\n"
    (out / "teacher_metrics.md").write_text(f"# {task.name} teacher\n\n{table}")
    metric = task.primary_metric
    plot_metric_vs_nfe({"teacher": ([r["nfe"] for r in result["rows"]],
                                    [r["metrics"][metric] for r in result["rows"]])}, metric,
                       out / f"teacher_{metric}_vs_nfe.png",
                       reference=result.get("reference", {}).get(metric), title=f"{task.name} teacher")
    task.save_samples_figure(pictures, labels, out / "teacher_samples.png")
    print(table)
    print(f"written to {out}/teacher_metrics.json (+ .md, plot, samples)")


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
