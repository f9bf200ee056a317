"""The notes of a diffusers export: ``stepdistill_export.json`` (the grids, the RNG order) and the
``README.md`` that says how to sample it without stepdistill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from stepdistill.pipelines.scheduler import GUIDANCE_SCALE, lcm_timesteps
from stepdistill.pipelines.staging import MARKER

if TYPE_CHECKING:
    from stepdistill.pipelines.export import ExportedStudent


def guidance_note(info: ExportedStudent, pipeline: str) -> str:
    """The README's sentence on the ``guidance_scale`` to pass."""
    if info.guidance_scale != GUIDANCE_SCALE:
        return (f"`guidance_scale={info.guidance_scale}` is the scale the student reproduces in one forward: the "
                "pipeline gives it to the UNet's guidance embedding (`time_cond_proj_dim`) and runs no CFG")
    return f"`guidance_scale={GUIDANCE_SCALE}` turns classifier-free guidance off (the {pipeline} default runs it)"


def write_notes(tmp: Path, out: Path, info: ExportedStudent, pipeline: str | None, steps: int) -> None:
    """``stepdistill_export.json`` (``MARKER``: every K's grid, the K LCM's default selection gets right)
    and ``README.md`` (how to sample the export) into ``tmp``, the staged ``out``."""
    n = info.schedule.num_train_timesteps
    m = info.original_steps
    grids = {str(k): info.grid(k) for k in range(1, 9)}
    exact = [k for k in range(1, 9) if lcm_timesteps(n, k, m) == grids[str(k)]]
    notes = {
        "format": "diffusers", "pipeline": pipeline, "backbone": info.class_name, "steps": steps,
        "guidance_scale": info.guidance_scale, "scheduler": "LCMScheduler",
        "prediction_type": info.prediction.to_diffusers(), "num_train_timesteps": n, "t_max": info.t_max,
        "original_inference_steps": m,
        "timesteps": grids, "default_timesteps_exact_for_steps": exact,
        "rng": "initial noise randn([B, C, H, W], generator) first, then one randn per re-noising step",
    }
    (tmp / MARKER).write_text(json.dumps(notes, indent=2) + "\n")
    grid = grids.get(str(steps), info.grid(steps))
    exact_here = lcm_timesteps(n, steps, m) == grid
    timesteps_arg = "" if exact_here else f", timesteps={grid}"
    set_arg = str(steps) if exact_here else f"timesteps={grid}"
    if pipeline is not None:
        usage = (f"```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
                 f"pipe = DiffusionPipeline.from_pretrained(\"{out}\")\n"
                 f"images = pipe([\"a prompt\"], num_inference_steps={steps}{timesteps_arg}, "
                 f"guidance_scale={info.guidance_scale},\n              generator=torch.Generator().manual_seed(0)).images\n```\n\n"
                 + guidance_note(info, pipeline) + "; a teacher safety checker, if copied, may blank images (pass `safety_checker=None` "
                 "to reproduce stepdistill's samples exactly)"
                 + ("; with `invisible-watermark` installed the SDXL pipeline watermarks its images (pass "
                    "`add_watermarker=False`)" if "XL" in pipeline else "") + ".\n")
    else:
        usage = ("```python\nimport torch\nfrom diffusers import LCMScheduler, UNet2DModel\n\n"
                 f"unet = UNet2DModel.from_pretrained(\"{out}\", subfolder=\"unet\")\n"
                 f"scheduler = LCMScheduler.from_pretrained(\"{out}\", subfolder=\"scheduler\")\n"
                 "g = torch.Generator().manual_seed(0)\n"
                 "x = torch.randn(len(labels), unet.config.in_channels, unet.config.sample_size, "
                 "unet.config.sample_size, generator=g)\n"
                 f"scheduler.set_timesteps({set_arg})\n"
                 "for t in scheduler.timesteps:\n"
                 "    x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample\n"
                 "images = (x / 2 + 0.5).clamp(0, 1)\n```\n\n"
                 f"One step by hand: `x0 = (x_T - sqrt(1 - abar[{grid[0]}]) * eps) / sqrt(abar[{grid[0]}])` with "
                 f"`abar = scheduler.alphas_cumprod`, `x_T` the standard normal noise (as drawn above) and "
                 f"`eps = unet(x_T, {grid[0]}, class_labels=labels).sample`.\n")
    (tmp / "README.md").write_text(
        f"# Few-step generator exported by stepdistill\n\n{info.class_name} student, {steps} steps "
        f"(timesteps {grid}), prediction `{info.prediction.to_diffusers()}`.\n\n{usage}")
