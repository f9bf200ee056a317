"""``stepdistill sample run=DIR [steps=K] [num_images=N] [seed=S] [out=DIR] ...``: a run's student samples.

Writes ``<out>/NNNN.png`` (one image per sample), ``<out>/grid.png`` and ``<out>/samples.json`` (what
was sampled: steps, seed, timesteps, labels or prompts); ``out`` defaults to ``<run>/samples``, next to
the trainer's ``step-XXXXXX.png`` grids. A later call replaces its own files; other files are kept,
and a name clash with one needs ``overwrite=true``.
2-D toy students write ``samples.npy`` and a scatter plot as ``grid.png`` instead of PNG images.

Sampling goes through ``stepdistill.pipelines.sample_student`` (the code path of ``FewStepPipeline``
and evaluation), so ``seed=S`` gives the images ``FewStepPipeline`` (and an exported diffusers
pipeline) gives for ``generator=torch.Generator().manual_seed(S)`` when all samples fit one batch.
Conditions: class students cycle the classes (``labels=[...]`` to choose), text students need
``prompt="..."`` (repeated) or ``prompts=FILE`` (one per line, cycled) unless the run config lists
``prompts`` (top level or under ``data``).

``hybrid_teacher_steps=k`` (``stepdistill.hybrid``): the run's teacher (``teacher.path``) takes the first k
DDIM steps from pure noise, the student the rest (k = 0: the student's own samples); samples.json
records k, the switch time and both grids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor

from stepdistill.args import parse_args
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.eval.report import scatter_panels
from stepdistill.hybrid import check_teacher_steps, hybrid_plan, run_teacher, sample_hybrid
from stepdistill.kernels.attention import set_run_attention
from stepdistill.pipelines.conditions import student_conditioning, teacher_dir
from stepdistill.pipelines.few_step import decode_latents, pixels_to_unit, sample_student
from stepdistill.pipelines.runs import load_run
from stepdistill.pipelines.scheduler import model_timesteps

MARKER = "samples.json"
KEYS: dict[str, str] = {"run": "str", "steps": "int", "num_images": "int", "seed": "int", "out": "str",
                        "overwrite": "bool", "batch_size": "int", "prompt": "str", "prompts": "str",
                        "labels": "ints", "device": "str", "hybrid_teacher_steps": "int"}
#: the teacher grid whose first k steps ``hybrid_teacher_steps=k`` runs (for students starting at t = 1)
TEACHER_GRID_STEPS = 50


def run(overrides: Sequence[str]) -> Path:
    """Sample a run's student into PNGs and a grid; returns the output directory."""
    args = parse_args(overrides, KEYS, "sample")
    student = load_run(args.get("run"))
    steps = int(args["steps"]) if "steps" in args else student.generator.steps
    num = int(args.get("num_images", 16))
    if steps < 1 or num < 1:
        raise StepdistillError(f"steps and num_images must be >= 1; got steps={steps}, num_images={num}")
    if "hybrid_teacher_steps" in args:  # a bad k, or a grid that cannot be re-spaced, fails before writing
        hybrid_plan(student.generator, args["hybrid_teacher_steps"], steps=steps, teacher_grid_steps=TEACHER_GRID_STEPS)
    cond, meta = student_conditioning(student, args, num)
    out = Path(str(args.get("out") or student.path / "samples"))
    names = [f"{i:04d}.png" for i in range(num)] + ["grid.png", "samples.npy", MARKER]
    previous = _prepare(out, names, bool(args.get("overwrite", False)))
    device = args.get("device", "cpu")
    generator = student.generator.to(device)
    set_run_attention(generator, student.config.get("trainer"), device)  # trainer.attention
    seed = int(args.get("seed", 0))
    if "hybrid_teacher_steps" in args:
        x0, hybrid = _hybrid_samples(student, cond, num, steps, seed, args, device)
        timesteps = hybrid.pop("student_timesteps")
    else:
        x0 = sample_student(generator, cond, num, steps, seed, batch_size=args.get("batch_size"))
        hybrid, timesteps = {}, model_timesteps(generator.schedule, generator.grid(steps))
    for name in previous:  # our files from an earlier call, only now that sampling worked
        (out / name).unlink(missing_ok=True)
    files = _write(out, x0, student, meta, device)
    record = {"run": str(student.path), "steps": steps, "seed": seed, "num_images": num,
              "timesteps": timesteps, **hybrid, **meta, "files": files}
    (out / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    how = f"{hybrid['hybrid_teacher_steps']} teacher + {steps} student steps" if hybrid else f"{steps} steps"
    print(f"{num} samples ({how}) written to {out}/ (grid.png)")
    return out


def _hybrid_samples(student, cond: Conditioning, num: int, steps: int, seed: int, args: dict,
                    device: str) -> tuple[Tensor, dict]:
    """Hybrid samples (the run's teacher first, ``stepdistill.hybrid``) and what samples.json records."""
    k = check_teacher_steps(args["hybrid_teacher_steps"], TEACHER_GRID_STEPS)
    plan = hybrid_plan(student.generator, k, steps=steps, teacher_grid_steps=TEACHER_GRID_STEPS)
    teacher = run_teacher(student.config).to(device)
    set_run_attention(teacher, student.config.get("trainer"), device)
    x0 = sample_hybrid(teacher, student.generator, cond, num, k, steps=steps, seed=seed,
                       batch_size=args.get("batch_size"), teacher_grid_steps=TEACHER_GRID_STEPS)
    schedule = student.generator.schedule
    record = {"hybrid_teacher_steps": k, "hybrid_teacher_grid_steps": TEACHER_GRID_STEPS,
              "teacher_guidance_scale": teacher.guidance_scale,
              "teacher_timesteps": model_timesteps(schedule, plan.teacher_grid[:-1]),
              "switch_timestep": model_timesteps(schedule, plan.student_grid[:1])[0],
              "student_timesteps": model_timesteps(schedule, plan.student_grid)}
    return x0, record


def _prepare(out: Path, names: list[str], overwrite: bool) -> list[str]:
    """Check ``out``; returns the files an earlier ``sample`` wrote there (replaced after sampling).

    Other files stay (the trainer's ``samples/step-XXXXXX.png``); a name clash with a file ``sample``
    did not write needs ``overwrite=true``.
    """
    if out.exists() and not out.is_dir():
        raise StepdistillError(f"out {str(out)!r} is a file; pass a directory")
    previous: list[str] = []
    if (out / MARKER).is_file():
        try:
            previous = [*json.loads((out / MARKER).read_text()).get("files", []), "grid.png", "samples.npy", MARKER]
        except (OSError, json.JSONDecodeError):
            previous = []
    clash = [n for n in names if (out / n).exists() and n not in previous]
    if clash and not overwrite:
        shown = ", ".join(clash[:3]) + (", ..." if len(clash) > 3 else "")
        raise StepdistillError(f"out directory {str(out)!r} already holds {shown} (not written by `stepdistill "
                               "sample`); choose another out= or pass overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    return [n for n in previous if n != MARKER]


def _write(out: Path, x0: Tensor, student, meta: dict, device: str) -> list[str]:
    if x0.dim() != 4:  # points (toy2d): an array and a scatter plot
        labels = torch.tensor(meta.get("labels", [0] * len(x0)))
        np.save(out / "samples.npy", x0.float().cpu().numpy())
        scatter_panels({f"{len(x0)} samples": x0.float().cpu()}, labels, out / "grid.png")
        return ["samples.npy"]
    if "prompts" in meta:
        vae = AutoencoderKL.from_pretrained(str(teacher_dir(student) / "vae")).to(device)
        with torch.no_grad():
            images = decode_latents(vae, x0)
    else:
        images = pixels_to_unit(x0)
    arrays = (images.float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    files = []
    for i, array in enumerate(arrays):
        files.append(f"{i:04d}.png")
        _save_png(array, out / files[-1])
    columns = len(set(meta["labels"])) if "labels" in meta and len(set(meta["labels"])) <= 16 \
        else math.ceil(math.sqrt(len(arrays)))
    _save_png(_tile(arrays, columns), out / "grid.png")
    return files


def _tile(arrays, columns: int, pad: int = 2):
    """One image of [N, H, W, C] uint8 tiles, ``columns`` wide, upscaled (nearest) to >= 64 px per tile."""
    n, h, w, c = arrays.shape
    scale = max(1, math.ceil(64 / max(h, w)))
    tiles = arrays.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = tile
    return grid


def _save_png(array, path: Path) -> None:
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)
