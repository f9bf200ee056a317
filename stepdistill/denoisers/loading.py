"""Load and save denoisers as local diffusers-format directories.

A teacher directory is either a pipeline-style directory (``unet/``, ``transformer/`` or
``denoiser/`` next to ``scheduler/``, as diffusers' ``save_pretrained`` writes it) or a single model
directory (``config.json`` + weights) with a ``scheduler_config.json`` beside it or in
``../scheduler/``. Hub ids are refused: our machines cannot reach a model hub.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import diffusers
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from stepdistill import lora
from stepdistill.denoisers import guidance_embedding
from stepdistill.denoisers.base import Denoiser
from stepdistill.errors import StepdistillError
from stepdistill.schedules import NoiseSchedule

#: backbone ``_class_name`` -> (module with the backbone class, adapter "module:Class")
ADAPTERS: dict[str, tuple[str, str]] = {
    "UNet2DModel": ("diffusers", "stepdistill.denoisers.diffusers:UNet2DDenoiser"),
    "UNet2DConditionModel": ("diffusers", "stepdistill.denoisers.diffusers:UNet2DConditionDenoiser"),
    "SD3Transformer2DModel": ("diffusers", "stepdistill.denoisers.diffusers:SD3Denoiser"),
    "ToyMLP": ("stepdistill.denoisers.toy", "stepdistill.denoisers.toy:ToyDenoiser"),
}
MODEL_SUBFOLDERS = ("unet", "transformer", "denoiser")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_local_dir(path: str | Path, what: str = "teacher") -> Path:
    """``path`` as an existing local directory, or a one-line StepdistillError saying what to do."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        return p
    if _HUB_ID.match(str(path)) and not p.exists():
        raise StepdistillError(
            f"{what} path {str(path)!r} looks like a model-hub id, but stepdistill loads only local "
            f"directories (no hub access): download it elsewhere with `hf download {path} --local-dir DIR` "
            f"and pass {what}.path=DIR")
    if p.exists():
        raise StepdistillError(f"{what} path {str(p)!r} is a file; pass a local diffusers directory")
    raise StepdistillError(f"{what} directory not found: {str(p)!r}; pass an existing local diffusers "
                           f"directory ({what}.path=DIR)")


def find_model_dir(root: Path) -> Path:
    """The backbone's directory inside a pipeline-style directory (or the directory itself)."""
    for name in MODEL_SUBFOLDERS:
        if (root / name / "config.json").is_file():
            return root / name
    if (root / "config.json").is_file():
        return root
    raise StepdistillError(f"no model found in {str(root)!r}: expected one of "
                           f"{'/, '.join(MODEL_SUBFOLDERS)}/ with a config.json, or a config.json in it")


def find_scheduler_config(root: Path, model_dir: Path) -> Path:
    for cand in (root / "scheduler" / "scheduler_config.json", model_dir / "scheduler_config.json",
                 model_dir.parent / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return cand
    raise StepdistillError(f"no scheduler config for {str(root)!r}: add scheduler/scheduler_config.json "
                           "(the diffusers scheduler the model was trained with)")


def load_schedule(path: str | Path) -> NoiseSchedule:
    """The NoiseSchedule of a local teacher directory, from its diffusers scheduler config."""
    root = resolve_local_dir(path)
    return schedule_from_config(read_scheduler_config(root))


def read_scheduler_config(root: Path) -> dict:
    config_file = find_scheduler_config(root, find_model_dir(root))
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StepdistillError(f"unreadable scheduler config {str(config_file)!r}: {e}") from None


def schedule_from_config(config: dict) -> NoiseSchedule:
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        return NoiseSchedule.from_diffusers(config)
    return NoiseSchedule.from_diffusers(cls.from_config(config))


def _import(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def load_denoiser(path: str | Path, *, dtype: torch.dtype | None = None) -> Denoiser:
    """Load a local directory's backbone and schedule behind the matching ``Denoiser`` adapter."""
    root = resolve_local_dir(path)
    model_dir = find_model_dir(root)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StepdistillError(f"unreadable model config {str(model_dir / 'config.json')!r}: {e}") from None
    class_name = config.get("_class_name")
    if class_name not in ADAPTERS:
        raise StepdistillError(f"unsupported backbone {class_name!r} in {str(model_dir)!r}; "
                               f"supported: {', '.join(ADAPTERS)}")
    module = ADAPTERS[class_name][0]
    backbone_cls = getattr(importlib.import_module(module), class_name)
    try:
        backbone = backbone_cls.from_pretrained(str(model_dir), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepdistillError(f"could not load weights from {str(model_dir)!r} (corrupt or "
                               f"incomplete checkpoint?): {first}") from None
    _restore_guidance_embedding(backbone, config, model_dir)
    scheduler_config = read_scheduler_config(root)
    denoiser = wrap_backbone(backbone, schedule_from_config(scheduler_config))
    denoiser.scheduler_config = scheduler_config
    return denoiser


#: ``teacher.dtype`` values -> the dtype of the teacher's frozen weights
TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(cfg: DictConfig) -> torch.dtype:
    """``teacher.dtype`` (fp32 | bf16 | fp16; missing or null: fp32, as runs saved before the key)."""
    value = cfg.teacher.get("dtype") or "fp32"
    if value not in TEACHER_DTYPES:
        raise StepdistillError(f"teacher.dtype={value!r} is not one of {', '.join(TEACHER_DTYPES)}: "
                               "set teacher.dtype=bf16 (or fp16 / fp32)")
    return TEACHER_DTYPES[value]


@torch.no_grad()
def cast_base_weights(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast ``module``'s floating-point weights and buffers to ``dtype`` in place (the same Parameter
    objects), all but LoRA adapter weights (``.lora_`` names: trainable adapters on the teacher's base
    stay fp32). bf16 halves the teacher's bytes (2 per parameter instead of 4)."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and p.dtype != dtype and ".lora_" not in name:
            p.data = p.data.to(dtype)
    for sub_name, sub in module.named_modules():
        for key, buffer in sub.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype and "lora_" not in sub_name:
                setattr(sub, key, buffer.to(dtype))
    return module


def _restore_guidance_embedding(backbone: torch.nn.Module, config: dict, model_dir: Path) -> None:
    """Backbones diffusers builds without ``time_cond_proj_dim`` (all but ``UNet2DConditionModel``)
    drop a student's guidance projection on load: add it back and read its weight from the file."""
    dim = config.get(guidance_embedding.CONFIG_KEY)
    if not dim or guidance_embedding.embedding_dim(backbone) is not None:
        return
    key = "time_embedding.cond_proj.weight"
    weights = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update({k: v for k, v in load_file(str(file)).items() if k == key})
    if key not in weights:
        raise StepdistillError(f"{str(model_dir)!r} declares a guidance embedding ({guidance_embedding.CONFIG_KEY}="
                               f"{dim}) but its weights have no {key}: the checkpoint is incomplete")
    guidance_embedding.add_guidance_embedding(backbone, int(dim))
    backbone.time_embedding.cond_proj.weight.data.copy_(weights[key])


def wrap_backbone(backbone: torch.nn.Module, schedule: NoiseSchedule) -> Denoiser:
    """``backbone`` behind its ``Denoiser`` adapter, answering in the schedule's prediction type."""
    name = type(backbone).__name__
    if name not in ADAPTERS:
        raise StepdistillError(f"no denoiser adapter for {name}; supported: {', '.join(ADAPTERS)}")
    return _import(ADAPTERS[name][1])(backbone, schedule, schedule.prediction)


def model_subfolder(backbone: torch.nn.Module) -> str:
    """Where a backbone lives in a pipeline-style directory: unet/, transformer/ or denoiser/."""
    name = type(backbone).__name__
    if "UNet" in name:
        return "unet"
    return "transformer" if "Transformer" in name else "denoiser"


#: the file diffusers' ``load_lora_weights(dir)`` reads
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_denoiser(denoiser: Denoiser, directory: str | Path) -> Path:
    """Write ``denoiser`` as a directory ``load_denoiser`` (and diffusers) read back: the backbone
    under unet/ | transformer/ | denoiser/ (safetensors) and scheduler/scheduler_config.json (the
    teacher's own scheduler config when known). A LoRA student is written merged (a plain model),
    with its adapters alone in ``lora/pytorch_lora_weights.safetensors`` (diffusers' LoRA layout)."""
    out = Path(directory)
    backbone = denoiser.backbone
    backbone = getattr(backbone, "module", backbone)
    if lora.has_lora(backbone):
        (out / "lora").mkdir(parents=True, exist_ok=True)
        save_file(lora.diffusers_lora_state_dict(backbone), str(out / "lora" / LORA_WEIGHTS))
        backbone = lora.merged_backbone(backbone)
    backbone.save_pretrained(out / model_subfolder(backbone))
    config = getattr(denoiser, "scheduler_config", None) or denoiser.schedule.to_diffusers_config()
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=2))
    return out
