"""``format=lora``: a LoRA student's adapters in the layout diffusers' ``load_lora_weights`` reads.

The output directory holds ``pytorch_lora_weights.safetensors`` (peft names under ``unet.``, the
scale alpha / rank folded into B), ``scheduler/`` (the LCMScheduler config that reproduces the
student's sampler: the teacher's table, the student's boundary scaling and solver grid) and a
README with the loading code. In a process that never imports stepdistill::

    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_pretrained(out_dir, subfolder="scheduler")
    pipe.load_lora_weights(out_dir)
    pipe(prompts, num_inference_steps=K, guidance_scale=1.0, generator=torch.Generator().manual_seed(s))

gives stepdistill's K-step samples for seed s (the RNG order of ``stepdistill.pipelines.export``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from stepdistill.denoisers.loading import LORA_WEIGHTS
from stepdistill.errors import StepdistillError
from stepdistill.pipelines.export import TEXT_BACKBONES, check_consistency_export, student_from_dir
from stepdistill.pipelines.staging import MARKER, check_out_dir, staged_directory


def export_lora(run_dir: str | Path, out_dir: str | Path, steps: int | None = None, *,
                overwrite: bool = False) -> Path:
    """Write a run's LoRA adapters for ``load_lora_weights`` (module docstring); returns ``out_dir``."""
    root = Path(run_dir)
    weights = root / "student" / "lora" / LORA_WEIGHTS
    if not weights.is_file():
        raise StepdistillError(f"run {str(root)!r} has no LoRA student (student/lora/{LORA_WEIGHTS}): train with "
                               "generator.lora_rank=R, or export the full student with format=diffusers")
    info = student_from_dir(root)
    if info.class_name not in TEXT_BACKBONES:
        raise StepdistillError(f"format=lora needs a text-to-image UNet student ({', '.join(TEXT_BACKBONES)}); "
                               f"this run's is {info.class_name}: use format=diffusers")
    check_consistency_export(info)
    steps = int(steps or info.steps)
    out = check_out_dir(out_dir, overwrite)
    with staged_directory(out) as tmp:
        shutil.copy2(weights, tmp / LORA_WEIGHTS)
        info.scheduler().save_config(tmp / "scheduler")
        _write_notes(tmp, out, info, steps)
    return out


def _write_notes(tmp: Path, out: Path, info, steps: int) -> None:
    base = str(info.teacher_dir) if info.teacher_dir is not None else "<the teacher's pipeline directory>"
    grid = info.grid(steps)
    notes = {"format": "lora", "base": base, "backbone": info.class_name, "steps": steps,
             "timesteps": grid, "guidance_scale": info.guidance_scale, "scheduler": "LCMScheduler",
             "original_inference_steps": info.original_steps, "weights": LORA_WEIGHTS}
    (tmp / MARKER).write_text(json.dumps(notes, indent=2) + "\n")
    (tmp / "README.md").write_text(
        f"# LoRA student exported by stepdistill\n\nAdapters for the {info.class_name} of `{base}`, sampled in "
        f"{steps} steps (timesteps {grid}) with LCMScheduler.\n\n```python\nimport torch\n"
        "from diffusers import DiffusionPipeline, LCMScheduler\n\n"
        f"pipe = DiffusionPipeline.from_pretrained(\"{base}\", safety_checker=None)\n"
        f"pipe.scheduler = LCMScheduler.from_pretrained(\"{out}\", subfolder=\"scheduler\")\n"
        f"pipe.load_lora_weights(\"{out}\")\n"
        f"images = pipe([\"a prompt\"], num_inference_steps={steps}, guidance_scale={info.guidance_scale},\n"
        "              generator=torch.Generator().manual_seed(0)).images\n```\n\n"
        "`guidance_scale=1.0` runs no classifier-free guidance: the student reproduces the teacher's guided "
        "output in one forward. `pipe.fuse_lora()` folds the adapters into the UNet for faster sampling.\n")
