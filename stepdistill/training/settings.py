"""The ``trainer.*`` settings and the ``Accelerator`` built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration

from stepdistill.errors import StepdistillError
from stepdistill.training.callbacks import LoggerConfig

PRECISIONS = ("auto", "no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp", "hsdp")
TEACHER_PLACEMENTS = ("replicate", "shard", "offload")
ATTENTION = ("sdpa", "xformers")


@dataclass
class TrainerConfig:
    """The ``trainer.*`` keys (configs/trainer/default.yaml has the same defaults).

    Args:
        max_steps: optimizer steps in the whole run (all phases together).
        batch_size: the GLOBAL batch per optimizer step, split over processes and micro-batches.
        seed: seeds the data (per step), the per-process torch RNG and the sample-grid noise.
        gradient_accumulation_steps: micro-batches per optimizer step.
        mixed_precision: auto (bf16 on a GPU that supports it, else no) | no | bf16 | fp16.
        ema_decay: EMA decay of the generator; null turns the EMA off.
        checkpoint_every: save every N steps (0: only at the end).
        keep_last: keep the newest K checkpoints (0: all).
        resume: null | auto | a checkpoint directory | a run directory.
        log_every: a logs.jsonl line / tracker point every N steps.
        sample_every: a sample grid every N steps (0: only at the end).
        num_samples: samples per grid.
        max_nonfinite_in_a_row: stop after this many skipped (non-finite) steps in a row.
        cpu: train on the CPU even when a GPU is present.
        find_unused_parameters: DDP's flag, for phases whose loss leaves some trained parameters unused.
        progress: show the progress bar (main process).
        max_wall_s: stop after this many seconds of the run (as if ``max_steps`` had been reached:
            last checkpoint, student, train.json), e.g. to train under a wall-time budget; null: no limit.
        strategy: ddp (every process holds every role) | fsdp (torch FSDP2: each trained role sharded
            per block over all processes) | hsdp (sharded within a node, replicated across nodes).
        teacher_placement: replicate (a full copy per process) | shard (sharded like the trained
            roles; fsdp / hsdp only) | offload (weights in CPU memory, moved to the device per block).
        gradient_checkpointing: recompute activations in backward (generator and critic).
        gradient_as_bucket_view: DDP's flag (gradients are views into its buckets: one copy fewer).
        attention: the attention backend of every role: sdpa | xformers (CUDA with xformers only).
    """

    max_steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    ema_decay: float | None = 0.999
    checkpoint_every: int = 500
    keep_last: int = 2
    resume: str | None = None
    log_every: int = 10
    sample_every: int = 500
    num_samples: int = 1000
    max_nonfinite_in_a_row: int = 10
    cpu: bool = False
    find_unused_parameters: bool = False
    progress: bool = True
    max_wall_s: float | None = None
    strategy: str = "ddp"
    teacher_placement: str = "replicate"
    gradient_checkpointing: bool = False
    gradient_as_bucket_view: bool = True
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        for key, allowed in (("mixed_precision", PRECISIONS), ("strategy", STRATEGIES),
                             ("teacher_placement", TEACHER_PLACEMENTS), ("attention", ATTENTION)):
            if getattr(self, key) not in allowed:
                raise StepdistillError(f"trainer.{key}={getattr(self, key)!r}; allowed: {', '.join(allowed)}")
        if self.strategy != "ddp" and self.mixed_precision == "fp16":
            raise StepdistillError(f"trainer.strategy={self.strategy} trains in bf16 or fp32: set "
                                   "trainer.mixed_precision=bf16 (or no)")
        if self.teacher_placement == "shard" and self.strategy == "ddp":
            raise StepdistillError("trainer.teacher_placement=shard needs trainer.strategy=fsdp or hsdp; "
                                   "with ddp use replicate or offload")
        for key in ("max_steps", "batch_size", "gradient_accumulation_steps", "max_nonfinite_in_a_row"):
            if int(getattr(self, key)) < 1:
                raise StepdistillError(f"trainer.{key} must be >= 1; got {getattr(self, key)}")
        if self.max_wall_s is not None and float(self.max_wall_s) <= 0:
            raise StepdistillError(f"trainer.max_wall_s must be > 0 or null; got {self.max_wall_s}")
        if self.ema_decay is not None and not 0.0 <= float(self.ema_decay) < 1.0:
            raise StepdistillError(f"trainer.ema_decay must be in [0, 1) or null; got {self.ema_decay}")


def resolve_mixed_precision(value: str, cpu: bool) -> str:
    if value != "auto":
        return value
    gpu = not cpu and torch.cuda.is_available()
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def build_accelerator(config: TrainerConfig, logger: LoggerConfig, output_dir: Path):
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise StepdistillError("accelerate launch --use_fsdp does not shard stepdistill's roles: launch without "
                               "--use_fsdp and set trainer.strategy=fsdp (or hsdp)")
    # Several launched processes without a GPU must ask for the CPU explicitly, or each one trains
    # alone (accelerate then starts no process group).
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = config.cpu or (launched > 1 and not torch.cuda.is_available())
    # step_scheduler_with_optimizer=False: one LR-schedule step per optimizer update whatever the
    # process count (batch_size is global), instead of accelerate's num_processes steps.
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=resolve_mixed_precision(config.mixed_precision, cpu),
        log_with=logger.log_with, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / "tensorboard")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters,
                                                       gradient_as_bucket_view=config.gradient_as_bucket_view)])
    if accelerator.num_processes != launched:
        raise StepdistillError(f"{launched} processes were launched but accelerate sees "
                               f"{accelerator.num_processes}; launch with accelerate launch --multi_gpu "
                               "--num_processes N (on a CPU: also trainer.cpu=true)")
    return accelerator
