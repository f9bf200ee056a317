"""A distillation run from a composed ``configs/train.yaml`` (``stepdistill train``, the benchmarks).

Builds task, teacher, generator, critic and
algorithm from their ``_target_`` nodes, and runs the ``Trainer``. Everything is built and checked
before anything is written, and a directory that already holds a run is reused only with
``trainer.resume=...`` or ``overwrite=true``.

Run directory: ``config.yaml`` (resolved), ``checkpoints/checkpoint-<step>/``, ``logs.jsonl``,
``samples/step-XXXXXX.png``, ``student/`` (diffusers format), ``train.json``, and ``wandb/`` or
``tensorboard/`` with those loggers.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig
from torch import nn

from stepdistill.adapters import parameter_count
from stepdistill.algorithms.base import Algorithm
from stepdistill.config import instantiate, no_critic_message, to_container
from stepdistill.data.trajectories import TrajectoryBatches, collect_trajectories
from stepdistill.denoisers.loading import cast_base_weights, load_denoiser, teacher_dtype
from stepdistill.errors import StepdistillError
from stepdistill.roles import Teacher
from stepdistill.training import checkpoint
from stepdistill.training.settings import TrainerConfig, build_accelerator
from stepdistill.training.sharding import check_shardable
from stepdistill.training.trainer import TaskBatches, Trainer
from stepdistill.workflows.evaluate import evaluate_run
from stepdistill.workflows.teacher import build_task, resolved_yaml

#: what a run writes; overwrite=true deletes these (and nothing else) when training starts
RUN_FILES = ("config.yaml", "checkpoints", "logs.jsonl", "samples", "student", "train.json", "wandb",
             "tensorboard", "metrics.json", "report.md", "samples_teacher_vs_student.png", "losses.png",
             "fid_vs_nfe.png", "swd_vs_nfe.png")


@dataclass
class TrainResult:
    """A finished run, for evaluation code.

    Attributes:
        algorithm: the trained algorithm (modules unwrapped, on the training device).
        generator: the generator to evaluate: the EMA one when enabled, else the online one.
        ema_generator: the EMA generator, or None when the EMA is off.
        task: the evaluation task.
        cfg: the resolved config.
        wall_s: training time of this invocation.
        history: every step's ``{"step", "phase", "loss"}`` since step 0 (resumed runs included).
        output_dir: the run directory.
        skipped_nonfinite: steps skipped by the non-finite guard.
    """

    algorithm: Algorithm
    generator: nn.Module
    ema_generator: nn.Module | None
    task: Any
    cfg: DictConfig
    wall_s: float
    history: list[dict[str, Any]]
    output_dir: Path
    skipped_nonfinite: int


def train(cfg: DictConfig) -> TrainResult:
    """Build everything from ``cfg``, check the output directory, train, and return the result."""
    trainer_cfg: TrainerConfig = instantiate(cfg.trainer)
    instantiate(cfg.optim), instantiate(cfg.logger)  # their mistakes are reported before anything is built
    out = check_output_dir(cfg.output_dir, cfg.overwrite, trainer_cfg.resume)
    _require_teacher_path(cfg)
    teacher_dtype(cfg)
    _require_metrics_if_evaluating(cfg)
    trainer = build_trainer(cfg, out)
    accelerator, task = trainer.accelerator, trainer.task
    accelerator.wait_for_everyone()  # every process has checked the directory before it changes
    if accelerator.is_main_process:
        start_run_dir(out, cfg.overwrite and not trainer_cfg.resume)
    accelerator.wait_for_everyone()
    fit = trainer.fit(on_start=lambda: (out / "config.yaml").write_text(resolved_yaml(cfg)))
    if accelerator.is_main_process:
        print(f"trained {fit.history[-1]['step'] + 1 if fit.history else 0} steps in {fit.wall_s:.0f} s; "
              f"student written to {out / 'student'}")
        if cfg.evaluate.enabled:
            evaluate_run(out, fit.generator, cfg, num_samples=cfg.evaluate.num_samples,
                         teacher_steps=cfg.evaluate.teacher_steps, batch_size=cfg.evaluate.batch_size,
                         noise_seeds=cfg.evaluate.get("noise_seeds"))
    return TrainResult(fit.algorithm, fit.generator, fit.ema.model if fit.ema is not None else None, task, cfg,
                       fit.wall_s, fit.history, out, fit.skipped_nonfinite)


def build_trainer(cfg: DictConfig, out: Path, *, logger: Any = None) -> Trainer:
    """The run ``cfg`` built as ``stepdistill train`` builds it: task, algorithm, accelerator, training
    batches (for AGD: the teacher's trajectories, collected where missing) and the ``Trainer`` writing
    under ``out`` (``logger``: default the config's). Nothing else is written before ``fit``."""
    trainer_cfg: TrainerConfig = instantiate(cfg.trainer)
    logger = logger if logger is not None else instantiate(cfg.logger)
    task = build_task(cfg)
    algorithm = build_algorithm(cfg, trainer_cfg.seed)
    check_shardable(algorithm.generator, trainer_cfg.strategy)  # before AGD's trajectories are collected
    accelerator = build_accelerator(trainer_cfg, logger, out)
    batches = training_batches(cfg, algorithm, task, accelerator, trainer_cfg.seed)
    return Trainer(algorithm, batches, trainer_cfg, instantiate(cfg.optim), out, logger=logger, task=task,
                   accelerator=accelerator, run_config=to_container(cfg))


def training_batches(cfg: DictConfig, algorithm: Algorithm, task: Any, accelerator: Any, seed: int):
    """The task's batches, or (with a ``trajectories`` node: AGD) the teacher's guided trajectories,
    collected first by the main process where missing (resumable)."""
    needs = algorithm.trains_on_trajectories
    if cfg.get("trajectories") is None:
        if needs:
            raise StepdistillError("AGD trains on the teacher's guided trajectories: add a `trajectories` node "
                                   "(see configs/experiment/digits/agd.yaml)")
        return TaskBatches(task, seed)
    if not needs:
        raise StepdistillError(f"`trajectories` is for AGD; {type(algorithm).__name__} trains on the task's "
                               "data: set trajectories=null")
    settings = instantiate(cfg.trajectories)
    if accelerator.is_main_process:
        adapters, base = parameter_count(algorithm.generator.adapters), parameter_count(algorithm.teacher.denoiser)
        print(f"guidance adapters: {adapters:,} trainable parameters, {100 * adapters / base:.2f}% of the "
              f"frozen base's {base:,}")
        conditions = TaskBatches(task, settings.seed)
        algorithm.teacher.to(accelerator.device)
        collect_trajectories(algorithm.teacher, lambda index, n: conditions(index, n).cond, settings)
    accelerator.wait_for_everyone()
    return TrajectoryBatches(settings.path, seed, num_shards=settings.num_shards)


def build_algorithm(cfg: DictConfig, seed: int) -> Algorithm:
    """teacher -> generator, critic (copies of the teacher's denoiser) -> algorithm. The teacher's
    weights are cast to ``teacher.dtype`` after the fp32 copies are made; LoRA roles share its base."""
    torch.manual_seed(seed)  # any randomly initialised heads are the same on every process
    _require_teacher_path(cfg)
    dtype = teacher_dtype(cfg)
    teacher = Teacher(load_denoiser(cfg.teacher.path), guidance_scale=cfg.teacher.guidance_scale)
    generator = instantiate(cfg.generator, denoiser=teacher.denoiser)
    roles: dict[str, Any] = {"teacher": teacher, "generator": generator}
    if cfg.critic is not None:
        if "_target_" not in cfg.critic:  # e.g. +critic.lora_rank=4 where the experiment has no critic
            raise StepdistillError(no_critic_message(cfg, sorted(cfg.critic)))
        roles["critic"] = instantiate(cfg.critic, denoiser=teacher.denoiser)
    cast_base_weights(teacher, dtype)
    return instantiate(cfg.algorithm, **roles)


def _require_teacher_path(cfg: DictConfig) -> None:
    if cfg.teacher.path is None:
        raise StepdistillError("teacher.path is required: a local diffusers directory (teacher.path=DIR)")


def _require_metrics_if_evaluating(cfg: DictConfig) -> None:
    """Before anything is built: the end-of-training evaluation needs a task with metrics."""
    task_cls = get_object(cfg.task._target_) if cfg.get("task") is not None else None
    if cfg.evaluate.enabled and task_cls is not None and task_cls.primary_metric is None:
        raise StepdistillError(f"the {task_cls.name!r} task has no metrics of its own: set evaluate.enabled=false "
                               "(and sample with `stepdistill sample run=DIR`)")


def check_output_dir(path: str | None, overwrite: bool, resume: str | None) -> Path:
    """The run directory; refuses (changing nothing) one that holds a run unless resuming or
    overwriting, and a ``trainer.resume`` that names no checkpoint."""
    if not path:
        raise StepdistillError("output_dir is required: add output_dir=DIR")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StepdistillError(f"output_dir {str(out)!r} is a file")
    existing = out.is_dir() and any(out.iterdir())
    if existing and not (resume or overwrite):
        raise StepdistillError(f"{str(out)!r} already holds a run; continue it with trainer.resume=auto, "
                               "start over with overwrite=true, or choose another output_dir")
    checkpoint.resolve_resume(resume, out)
    return out


def start_run_dir(out: Path, clear: bool) -> None:
    """Create ``out``; with ``clear`` (overwrite=true, no resume) delete the previous run's files."""
    out.mkdir(parents=True, exist_ok=True)
    if clear:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
