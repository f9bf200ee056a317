"""The conditions a run's student samples for (class labels, prompts or none) and its teacher's directory."""

from __future__ import annotations

from pathlib import Path

import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.prompts import PromptEncoder
from stepdistill.errors import StepdistillError


def student_conditioning(student, args: dict, num: int) -> tuple[Conditioning, dict]:
    """``num`` conditions for a run's student (``StudentRun``) and what ``samples.json`` records of them:
    prompts (``args``: ``prompt``, ``prompts`` file, else the run config's), class labels (``labels``,
    else the classes cycled) or none."""
    config = student.generator.denoiser.backbone.config
    name = type(student.generator.denoiser.backbone).__name__
    if name in ("UNet2DConditionModel", "SD3Transformer2DModel"):
        prompts = student_prompts(student, args, num)
        encoder = PromptEncoder.from_pretrained(teacher_dir(student))
        return encoder.encode(prompts), {"prompts": prompts}
    classes = num_classes(config)
    if classes:
        labels = args.get("labels") or list(range(classes))
        bad = [v for v in labels if not 0 <= v < classes]
        if bad:
            raise StepdistillError(f"labels {bad} out of range: the student has classes 0..{classes - 1}")
        labels = [labels[i % len(labels)] for i in range(num)]
        return Conditioning(class_labels=torch.tensor(labels), null_class=classes), {"labels": labels}
    return Conditioning.none(num), {}


def num_classes(config) -> int:
    """Real classes of a class-conditional backbone (the last embedding is the null class), else 0."""
    if config.get("num_classes"):  # ToyMLP
        return int(config["num_classes"])
    if config.get("num_class_embeds"):  # UNet2DModel, null class last (stepdistill.teachers)
        return int(config["num_class_embeds"]) - 1
    return 0


def student_prompts(student, args: dict, num: int) -> list[str]:
    """``num`` prompts, cycled: ``args["prompt"]``, the lines of ``args["prompts"]``, else the run config's."""
    if args.get("prompt"):
        prompts = [args["prompt"]]
    elif args.get("prompts"):
        path = Path(args["prompts"])
        if not path.is_file():
            raise StepdistillError(f"prompts file not found: {str(path)!r} (one prompt per line)")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        config = student.config
        listed = config.get("prompts") or (config.get("data") or {}).get("prompts")
        prompts = [str(p) for p in listed] if listed else []
    if not prompts:
        raise StepdistillError("a text-to-image student needs prompts: pass prompt=\"...\" or prompts=FILE")
    return [prompts[i % len(prompts)] for i in range(num)]


def teacher_dir(student) -> Path:
    """The run's ``teacher.path``, whose VAE and text encoders a text-to-image student samples with."""
    path = student.teacher_path
    if path is None or not path.is_dir():
        raise StepdistillError(f"the run's teacher.path ({str(path)!r}) is not a directory: its VAE and text "
                               "encoders are needed to sample a text-to-image student")
    return path
