"""From ``stepdistill plan`` arguments to a composed training config, a ``MetaStack`` and a ``Job``.

The planner's own keys (``PLAN_KEYS``) are taken out of the arguments; everything else is a training
override composed exactly as ``stepdistill train`` composes it (``config.compose_train``). Keys the memory
switches read are forced in (``++key=value``) so ``critic.lora_rank=64`` works on an experiment whose
critic node does not list it. Keys are read with defaults, so configs written before a switch
existed are sized as they run.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from stepdistill.adapters import GuidanceAdapters  # imports diffusers: only for AGD
from stepdistill.config import compose_train, instantiate, no_critic_message
from stepdistill.denoisers.loading import ADAPTERS, teacher_dtype, wrap_backbone
from stepdistill.errors import StepdistillError
from stepdistill.planner.estimate import Job, RoleSpec, algorithm_setting
from stepdistill.planner.presets import EXPERIMENT_PRESETS, PRESETS, preset
from stepdistill.planner.stack import MetaStack, preset_stack
from stepdistill.schedules import NoiseSchedule
from stepdistill.training.optim import OPTIMIZERS

#: the planner's own arguments (not training overrides)
PLAN_KEYS = ("gpus", "gpu_memory", "gpus_per_node", "resolution", "frames", "backbone", "out")
#: training keys forced into the config (``++``): switches an experiment's nodes may not list yet
FORCED = ("critic.lora_rank", "critic.lora_alpha", "critic.lora_target_modules", "generator.lora_rank",
          "generator.lora_alpha", "generator.lora_target_modules", "teacher.dtype", "optim.name", "data.cache")
#: the experiment a bare ``backbone=`` is sized with (DMD2's SDXL recipe: 4 steps, a full critic, no EMA)
DEFAULT_EXPERIMENT = "sdxl/dmd2"
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(gb|gib|mb|mib|tb|tib|g)?\s*$", re.I)
_UNITS = {None: 1e9, "g": 1e9, "gb": 1e9, "gib": 2**30, "mb": 1e6, "mib": 2**20, "tb": 1e12, "tib": 2**40}


@dataclass(frozen=True)
class PlanArgs:
    """The planner's own arguments."""

    gpus: int = 1
    gpu_memory: int = int(80e9)
    gpus_per_node: int | None = None
    resolution: tuple[int, int] | None = None
    frames: int | None = None
    backbone: str | None = None
    out: str | None = None


def parse_size(text: str) -> int:
    """``80GB`` / ``24 GB`` / ``40GiB`` / ``81920MiB`` / ``80`` (GB) as bytes (GB = 10^9)."""
    match = _SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise StepdistillError(f"gpu_memory={text!r} is not a memory size: write it like 80GB, 24GB or 40GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower() if match.group(2) else None])


def parse_resolution(text: str) -> tuple[int, int]:
    """``1024`` or ``768x1344`` (height x width) in pixels."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise StepdistillError(f"resolution={text!r} is not a size: write 1024 or HEIGHTxWIDTH (768x1344)")
    return (values[0], values[-1])


def _positive_int(key: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise StepdistillError(f"{key}={text!r} is not a whole number") from None
    if value < 1:
        raise StepdistillError(f"{key} must be >= 1; got {value}")
    return value


def split_args(args: Sequence[str]) -> tuple[PlanArgs, list[str]]:
    """(the planner's arguments, the training overrides)."""
    mine: dict[str, Any] = {}
    overrides = []
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in PLAN_KEYS:
            overrides.append(arg)
        elif key in ("gpus", "gpus_per_node", "frames"):
            mine[key] = _positive_int(key, value)
        elif key == "gpu_memory":
            mine[key] = parse_size(value)
        elif key == "resolution":
            mine[key] = parse_resolution(value)
        else:
            mine[key] = value
    if "backbone" in mine:
        preset(mine["backbone"])  # an unknown one: the allowed list, before anything is composed
    return PlanArgs(**mine), overrides


def compose_job_config(plan: PlanArgs, overrides: Sequence[str]) -> DictConfig:
    """The training config, composed as ``stepdistill train`` composes it (a bare ``backbone=`` gets
    the DMD2 recipe of ``DEFAULT_EXPERIMENT``)."""
    forced = [f"++{o}" if o.split("=", 1)[0] in FORCED else o for o in overrides]
    if not any(o.startswith("experiment=") for o in forced):
        if plan.backbone is None and not any(o.startswith("teacher.path=") for o in forced):
            raise StepdistillError(f"choose what to size: experiment=<dataset>/<name>, backbone=<{'|'.join(PRESETS)}> "
                                   "or teacher.path=DIR")
        forced.insert(0, f"experiment={DEFAULT_EXPERIMENT}")
    if not any(o.startswith("output_dir=") for o in forced):
        forced.append("output_dir=plan-not-written")
    return compose_train(forced)


def stack_for(cfg: DictConfig, plan: PlanArgs) -> MetaStack:
    """``backbone=`` when given, else ``teacher.path`` (its config files), else the experiment's preset."""
    if plan.backbone is not None:
        return preset_stack(plan.backbone)
    path = OmegaConf.select(cfg, "teacher.path")
    if path:
        return MetaStack.from_dir(str(path))
    experiment = str(cfg.get("experiment_name") or "")
    name = EXPERIMENT_PRESETS.get(experiment.split("/", 1)[0])
    if name is None:
        raise StepdistillError(f"experiment {experiment!r} names no teacher: add teacher.path=DIR (a local diffusers "
                               f"directory; only its config files are read) or backbone=<{'|'.join(PRESETS)}>")
    return preset_stack(name)


def job_from_config(cfg: DictConfig, plan: PlanArgs, stack: MetaStack) -> Job:
    """What the accounting needs, read from ``cfg`` with defaults (see the module docstring)."""
    trainer = instantiate(cfg.trainer)
    teacher_dtype(cfg)  # validates teacher.dtype
    optim = cfg.get("optim") or {}
    shared = optim.get("name") or "adamw"
    critic = cfg.get("critic")
    has_critic = critic is not None and "_target_" in critic
    if critic is not None and not has_critic:  # critic.* overrides forced into an experiment without one
        raise StepdistillError(no_critic_message(cfg, list(critic)))
    phases = ("critic", "generator") if has_critic else ("generator",)
    optimizers = tuple((ph, str((optim.get(ph) or {}).get("name") or shared)) for ph in phases)
    for _, name in optimizers:
        if name not in OPTIMIZERS:
            raise StepdistillError(f"optim.name={name!r} is not an optimizer; allowed: {', '.join(OPTIMIZERS)}")
    data = cfg.get("data") or {}
    gen_spec = _role(cfg.generator, None, stack)
    critic_spec = _role(critic, cfg.generator, stack) if has_critic else None
    head = bool(critic.get("head", False)) if has_critic else False
    gan_weight = float(algorithm_setting(cfg, "gan_weight", 0.0) or 0.0)  # SiD's switch for both GAN terms
    gan_generator = head and max(float(algorithm_setting(cfg, "gan_generator_weight", 0.0) or 0.0), gan_weight) > 0
    gan_critic = head and float(algorithm_setting(cfg, "gan_critic_weight", 0.0) or 0.0) > 0 and (
        gan_weight > 0 or "gan_weight" not in _algorithm_keys(cfg))
    resolution = plan.resolution or (_square(data.get("resolution")) if data.get("resolution") else None)
    return Job(
        gpus=plan.gpus, gpus_per_node=plan.gpus_per_node or min(plan.gpus, 8), gpu_memory=plan.gpu_memory,
        strategy=trainer.strategy, teacher_placement=trainer.teacher_placement,
        checkpointing=bool(trainer.gradient_checkpointing), bucket_view=bool(trainer.gradient_as_bucket_view),
        mixed_precision={"auto": "bf16"}.get(trainer.mixed_precision, trainer.mixed_precision),
        teacher_dtype=str(cfg.teacher.get("dtype") or "fp32"), optimizers=optimizers,
        cached=bool(data.get("cache")), images=str(data.get("_target_", "")).endswith("ImageCaptionData"),
        batch_size=int(trainer.batch_size), accumulation=int(trainer.gradient_accumulation_steps),
        ema=trainer.ema_decay is not None, generator=gen_spec, critic=critic_spec, head=head,
        head_width=critic.get("head_width") if has_critic else None,
        gan_generator=gan_generator, gan_critic=gan_critic,
        cfg_factor=_cfg_factor(cfg), grad_through_scores=bool(algorithm_setting(cfg, "grad_through_scores", False)),
        target_network=float(algorithm_setting(cfg, "target_decay", 0.0) or 0.0) > 0,
        resolution=resolution, frames=plan.frames)


def _algorithm_keys(cfg: DictConfig) -> set[str]:
    """The algorithm's constructor arguments (SiD's GAN critic term follows its ``gan_weight``)."""
    try:
        return set(inspect.signature(get_object(cfg.algorithm["_target_"])).parameters)
    except Exception:  # noqa: BLE001 - an unimportable target: no keys
        return set()


def _role(node: Any, fallback: Any, stack: MetaStack) -> RoleSpec:
    """A generator or critic node as a ``RoleSpec`` (LoRA targets: the node's, the generator's, the
    stack's defaults)."""
    if str(node.get("_target_", "")).endswith("AdapterGenerator"):
        return RoleSpec("adapters", adapter_parameters=_adapter_parameters(node, stack))
    rank = node.get("lora_rank")
    if not rank:
        return RoleSpec()
    targets = node.get("lora_target_modules") or (fallback.get("lora_target_modules") if fallback else None)
    if targets is not None and not isinstance(targets, str):
        targets = tuple(str(t) for t in targets)
    return RoleSpec("lora", int(rank), targets)


def _adapter_parameters(node: Any, stack: MetaStack) -> int:
    """AGD's guidance adapters on the stack's denoiser, built on ``meta`` and counted."""
    if stack.class_name not in ADAPTERS:
        raise StepdistillError(f"AGD's adapters need a {', '.join(ADAPTERS)} denoiser; got {stack.class_name}")
    schedule = NoiseSchedule.from_diffusers({"num_train_timesteps": 1000})
    denoiser = wrap_backbone(stack.backbone, schedule)
    with torch.device("meta"):
        adapters = GuidanceAdapters(denoiser, node.get("kind", "cross_attention"), int(node.get("dim", 64)),
                                    int(node.get("attn_dim", 16)), int(node.get("heads", 1)),
                                    node.get("target_modules"))
    return sum(p.numel() for p in adapters.parameters())


def _cfg_factor(cfg: DictConfig) -> int:
    """2 when the teacher runs with CFG (a batch of conditional and unconditional samples), else 1."""
    scale = algorithm_setting(cfg, "guidance_scale", None)
    if scale is None:
        scale = algorithm_setting(cfg, "guidance_teacher", None)
    if scale is None:
        scale = cfg.teacher.get("guidance_scale", 1.0)
    if OmegaConf.is_list(scale) or isinstance(scale, (list, tuple)):
        return 2
    return 1 if float(scale) == 1.0 else 2


def _square(value: Any) -> tuple[int, int]:
    return (int(value), int(value))
