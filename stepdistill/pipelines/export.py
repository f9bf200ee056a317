"""Export a few-step generator as a directory that diffusers loads and samples without stepdistill.

Text-to-image students (``UNet2DConditionModel``: SD1.5- or SDXL-like) become a standard
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` directory: the teacher's text encoders,
tokenizers, VAE, feature extractor, ... copied, ``unet/`` replaced by the student's, and
``scheduler/`` an ``LCMScheduler`` config (``few_step_scheduler``). In a process that never imports
stepdistill::

    pipe = DiffusionPipeline.from_pretrained(out_dir)
    images = pipe(prompts, num_inference_steps=K, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(seed)).images

gives stepdistill's K-step samples for that seed (``FewStepPipeline`` / ``sample_student``) to float
tolerance. ``guidance_scale=1.0`` matters: the SD pipelines run classifier-free guidance whenever
``guidance_scale > 1`` (their defaults are 7.5 and 5.0), which the generator was not trained with.

Why ``LCMScheduler`` reproduces ``stepdistill.sampling.renoise_sample`` (read in diffusers 0.42's source):

- ``step`` computes x0 from the model output (``epsilon``: ``(x - sqrt(1 - abar) eps) / sqrt(abar)``;
  ``v_prediction``: ``sqrt(abar) x - sqrt(1 - abar) v``; ``sample``), returns
  ``c_out x0 + c_skip x`` and re-noises it to the next timestep with ``randn_tensor(shape, generator)``,
  except at the last step. With ``timestep_scaling = 1e6`` the boundary scalings are c_skip <= 2.5e-13
  and c_out = 1 in float32 at every timestep >= 1, so the denoised sample is x0 itself.
- ``abar`` is the teacher's table: the config keeps the teacher scheduler's beta fields (checked
  against the student's ``NoiseSchedule``; ``trained_betas`` when they disagree).
- With ``original_inference_steps = N`` (N = num_train_timesteps) LCM picks timesteps
  ``N - 1 - floor(i N / K)``, i < K; stepdistill's trailing grid is ``round(N - i N / K) - 1``. They
  agree when every ``i N / K`` has a fractional part below 1/2 (K dividing N): for N = 1000 and
  K <= 32, K = 1, 2, 4, 5, 8, 10, 20, 25, but not K = 3 (999, 666, 333 vs ours 999, 666, 332). For
  the other K pass the grid explicitly,
  ``pipe(..., timesteps=[999, 666, 332])``; ``stepdistill_export.json`` lists every K's grid and the K
  the default selection gets right.
- RNG: the pipeline draws the initial latents first (``randn_tensor``), then the scheduler one fresh
  noise per non-final step, in the order ``stepdistill.pipelines.few_step`` documents. Pass a CPU
  ``torch.Generator`` (stepdistill draws on the CPU).

Exactness also needs ``safety_checker=None`` when the teacher directory has a safety checker (it
is copied, and blanks flagged images), and for SDXL ``add_watermarker=False`` when the
``invisible-watermark`` package is installed. Images match to ~1e-6, latents to ~1e-7 relative
(diffusers computes x0 in float32, stepdistill in float64).

Flow-matching students (SD3) are not exported: ``StableDiffusion3Pipeline`` does not pass its
``generator`` to the scheduler's ``step``, so FlowMatchEuler's ``stochastic_sampling`` re-noises with
the global RNG and multi-step samples cannot be reproduced per seed.

Class-conditional students (``UNet2DModel``) have no diffusers pipeline that takes class labels, so
the export is ``unet/`` + ``scheduler/`` (the same LCM config) and the rule. One step from
``x_T = randn([B, C, H, W], generator)`` at the generator's first timestep T0 = round(t_max (N - 1))
(999 for t_max = 1; 699 for the digits students, t_max = 0.7)::

    eps_hat = unet(x_T, T0, class_labels=labels).sample
    x0 = (x_T - sqrt(1 - abar[T0]) * eps_hat) / sqrt(abar[T0])        # v: sqrt(abar) x_T - sqrt(1 - abar) v

with ``abar = LCMScheduler.from_pretrained(out_dir, subfolder="scheduler").alphas_cumprod``; x0 is
the image in [-1, 1]. K steps: ``scheduler.set_timesteps(K)`` and the usual loop
``x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=generator).prev_sample``.

Generators that start below pure-noise time (t_max < 1: x_T is standard normal noise given to the
network as timestep T0) keep the same rules: the scheduler's ``original_inference_steps`` is T0 + 1,
so LCM's default K-step selection starts at T0 (``lcm_original_steps``); for t_max <= 0.5 LCM cannot
express that and the export's notes give the grid to pass as ``timesteps=``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stepdistill.errors import StepdistillError
from stepdistill.roles import Generator, step_grid
from stepdistill.schedules import NoiseSchedule, Prediction

#: LCM's boundary-condition time scaling: large enough that c_skip = 0 and c_out = 1 in float32
TIMESTEP_SCALING = 1e6
#: the guidance_scale to pass to the exported SD / SDXL pipeline (no classifier-free guidance)
GUIDANCE_SCALE = 1.0
#: marks a directory written by ``export_diffusers`` (and so safe to replace with overwrite=True)
MARKER = "stepdistill_export.json"
TEXT_BACKBONES = ("UNet2DConditionModel",)
CLASS_BACKBONES = ("UNet2DModel",)


# --------------------------------------------------------------------------- the scheduler
def few_step_scheduler(schedule: NoiseSchedule, base_config: dict | None = None,
                       prediction: Prediction | str | None = None, t_max: float = 1.0, *,
                       timestep_scaling: float | None = None, original_steps: int | None = None) -> Any:
    """The diffusers scheduler whose ``step`` is the generator's re-noising step (module docstring).

    VP: ``LCMScheduler`` on the teacher's table (``base_config``'s beta fields, else the schedule's
    own betas), ``original_inference_steps`` = ``lcm_original_steps`` (N for a generator starting
    at t_max = 1), ``timestep_scaling = 1e6``; a consistency student passes its own boundary scaling
    and solver grid (``timestep_scaling = 10``, ``original_steps = 50`` for LCM). Flow: the teacher's
    ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling=True`` (x0 = x - sigma v, then
    re-noised to the next sigma with fresh noise).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    prediction = Prediction(prediction or schedule.prediction)
    if schedule.kind == "flow":
        base = _fit(FlowMatchEulerDiscreteScheduler, base_config or schedule.to_diffusers_config())
        return FlowMatchEulerDiscreteScheduler.from_config({**base, "shift": schedule.shift,
                                                            "stochastic_sampling": True})
    if prediction == Prediction.FLOW:
        raise StepdistillError("a flow-prediction backbone needs a flow schedule")
    n = schedule.num_train_timesteps
    # steps_offset is unused by LCM; 1 keeps the SD pipelines from warning and rewriting the config
    overrides = dict(num_train_timesteps=n,
                     original_inference_steps=original_steps or lcm_original_steps(schedule, t_max),
                     timestep_scaling=timestep_scaling or TIMESTEP_SCALING,
                     prediction_type=prediction.to_diffusers(), clip_sample=False, thresholding=False,
                     set_alpha_to_one=True, steps_offset=1, timestep_spacing="trailing")
    scheduler = LCMScheduler.from_config({**_fit(LCMScheduler, base_config or {}), **overrides})
    if base_config is None or not _same_table(scheduler, schedule):
        betas = schedule.to_diffusers_config()["trained_betas"]
        scheduler = LCMScheduler.from_config({**overrides, "trained_betas": betas,
                                              "rescale_betas_zero_snr": False})
    return scheduler


def lcm_original_steps(schedule: NoiseSchedule, t_max: float = 1.0) -> int:
    """LCM's ``original_inference_steps`` M whose default selection starts at the generator's first
    timestep T0 = round(t_max (N - 1)): M = T0 + 1 when N // M == 1 (LCM's training grid is then
    0..M-1), else N (t_max <= 0.5: pass the grid as ``timesteps=``)."""
    n = schedule.num_train_timesteps
    top = round(t_max * (n - 1)) + 1
    return top if n // top == 1 else n


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int | None = None) -> list[int]:
    """The timesteps ``LCMScheduler(original_inference_steps=M).set_timesteps(K)`` selects (M = N by default)."""
    n = int(num_train_timesteps)
    m = n if original_steps is None else int(original_steps)
    k = n // m
    return [(m - (i * m) // steps) * k - 1 for i in range(steps)]


def generator_timesteps(schedule: NoiseSchedule, steps: int, t_max: float = 1.0,
                        timesteps: list[float] | None = None) -> list[int] | list[float]:
    """The backbone timesteps of a ``Generator``'s K-step grid (``Generator.grid``: its own
    ``timesteps`` for their K, else evenly spaced from ``t_max``)."""
    return model_timesteps(schedule, step_grid(schedule, steps, t_max, timesteps))


def model_timesteps(schedule: NoiseSchedule, grid: torch.Tensor) -> list[int] | list[float]:
    """The backbone timesteps of a grid of times: integers for VP tables (when the grid is on the table),
    floats otherwise."""
    values = [float(v) for v in schedule.to_model_time(grid)]
    if schedule.kind == "vp" and all(abs(v - round(v)) < 1e-6 for v in values):
        return [int(round(v)) for v in values]
    return [round(v, 3) for v in values]


def _same_table(scheduler: Any, schedule: NoiseSchedule) -> bool:
    ab = scheduler.alphas_cumprod.double()
    ref = schedule.alphas_cumprod
    return ab.shape == ref.shape and bool(((ab - ref).abs() <= 1e-6 * ref.clamp_min(1e-6)).all())


def _fit(cls: type, config: dict) -> dict:
    """``config`` restricted to ``cls.__init__``'s parameters (no unexpected-key warnings)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in dict(config).items() if k in params}


# --------------------------------------------------------------------------- students
@dataclass
class _Student:
    """What an export needs to know about a student, however it was given."""

    class_name: str
    unet_config: dict
    schedule: NoiseSchedule
    prediction: Prediction
    base_scheduler_config: dict | None
    steps: int
    t_max: float
    write_unet: Any  # callable(dest: Path)
    teacher_dir: Path | None = None
    consistency: dict | None = None  # a ConsistencyGenerator's timestep_scaling, solver_steps, sampler, ...
    timesteps: list[float] | None = None  # the generator's own grid for ``steps`` (``Generator.timesteps``)

    @property
    def original_steps(self) -> int:
        """LCMScheduler's ``original_inference_steps`` for this student."""
        if self.consistency:
            return int(self.consistency["solver_steps"])
        return lcm_original_steps(self.schedule, self.t_max)

    def grid(self, steps: int) -> list[int] | list[float]:
        """The backbone timesteps of the student's ``steps``-step grid."""
        if self.consistency:  # LCMScheduler's selection from the student's solver grid
            m = self.original_steps
            solver = self.schedule.timesteps(m, self.t_max)
            times = self.schedule.to_model_time(solver[[(i * m) // steps for i in range(steps)]])
            return [int(round(float(v))) for v in times]
        return generator_timesteps(self.schedule, steps, self.t_max, self.timesteps)

    def scheduler(self) -> Any:
        c = self.consistency or {}
        return few_step_scheduler(self.schedule, self.base_scheduler_config, self.prediction, self.t_max,
                                  timestep_scaling=c.get("timestep_scaling"),
                                  original_steps=self.original_steps if c else None)

    @property
    def guidance_scale(self) -> float:
        """What to pass as the pipeline's ``guidance_scale``: the student's own scale when it takes one
        through ``time_cond_proj_dim`` (the SD pipelines embed it), else 1 (no CFG)."""
        if self.consistency and self.unet_config.get("time_cond_proj_dim"):
            return float(self.consistency.get("guidance_scale", GUIDANCE_SCALE))
        return GUIDANCE_SCALE


CONSISTENCY_KEYS = ("timestep_scaling", "solver_steps", "sampler", "guidance_scale")


def _consistency_settings(settings: dict) -> dict | None:
    if "solver_steps" not in settings:
        return None
    return {k: settings.get(k) for k in CONSISTENCY_KEYS}


def _student_from_generator(generator: Generator) -> _Student:
    backbone = getattr(generator.denoiser.backbone, "module", generator.denoiser.backbone)

    def write(dest: Path) -> None:
        backbone.save_pretrained(dest, safe_serialization=True)

    consistency = _consistency_settings(vars(generator)) if hasattr(generator, "solver_steps") else None
    return _Student(type(backbone).__name__, dict(backbone.config), generator.schedule,
                    generator.denoiser.prediction, getattr(generator.denoiser, "scheduler_config", None),
                    generator.steps, generator.t_max, write, consistency=consistency,
                    timesteps=getattr(generator, "timesteps", None))


def _student_from_dir(path: str | Path) -> _Student:
    """A student directory (unet/ + scheduler/, as ``save_denoiser`` writes) or a run directory."""
    from omegaconf import OmegaConf

    from stepdistill.denoisers.loading import (
        find_model_dir,
        read_scheduler_config,
        resolve_local_dir,
        schedule_from_config,
    )

    root = resolve_local_dir(path, "student")
    steps, t_max, teacher, consistency, timesteps = 1, 1.0, None, None, None
    if (root / "config.yaml").is_file() or (root / "student").is_dir():  # a run directory
        if not (root / "student").is_dir():
            raise StepdistillError(f"run {str(root)!r} has no student/ directory (is training finished?)")
        config = OmegaConf.load(root / "config.yaml") if (root / "config.yaml").is_file() else {}
        gen = config.get("generator") or {}
        steps, t_max = int(gen.get("steps", 1) or 1), float(gen.get("t_max", 1.0) or 1.0)
        consistency = _consistency_settings(dict(gen))
        timesteps = list(gen["timesteps"]) if gen.get("timesteps") is not None else None
        teacher_path = (config.get("teacher") or {}).get("path")
        teacher = Path(str(teacher_path)) if teacher_path else None
        root = root / "student"
    model_dir = find_model_dir(root)
    unet_config = json.loads((model_dir / "config.json").read_text())
    scheduler_config = read_scheduler_config(root)
    schedule = schedule_from_config(scheduler_config)

    def write(dest: Path) -> None:
        shutil.copytree(model_dir, dest)

    return _Student(unet_config.get("_class_name", "?"), unet_config, schedule, schedule.prediction,
                    scheduler_config, steps, t_max, write, teacher, consistency, timesteps)


# --------------------------------------------------------------------------- output directories
def check_out_dir(out: str | Path, overwrite: bool, marker: str = MARKER) -> Path:
    """``out`` if it is absent or empty, or (with ``overwrite``) holds ``marker``; else a one-line error."""
    if not out:
        raise StepdistillError("out=DIR is required")
    path = Path(str(out)).expanduser()
    if path.exists() and not path.is_dir():
        raise StepdistillError(f"out {str(path)!r} is a file; pass a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise StepdistillError(f"out directory {str(path)!r} already exists and is not empty; choose "
                                   "another out= or pass overwrite=true")
        if not (path / marker).is_file():
            raise StepdistillError(f"out directory {str(path)!r} holds files stepdistill did not write (no "
                                   f"{marker}); refusing to overwrite it: choose another out=")
    return path


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``out`` that replaces ``out`` when the block succeeds and
    is deleted when it fails (an earlier ``out`` is then left as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- export
def export_diffusers(student: Generator | str | Path, teacher_dir: str | Path | None, out_dir: str | Path,
                     steps: int | None = None, *, overwrite: bool = False) -> Path:
    """Write a diffusers directory that reproduces the generator's K-step samples (module docstring).

    Args:
        student: a ``Generator``, a student directory (``unet/`` + ``scheduler/``, as ``save_denoiser``
            writes it) or a run directory (``config.yaml`` + ``student/``).
        teacher_dir: the teacher's diffusers pipeline directory (text students: the text encoders,
            tokenizers and VAE come from it); default: a run's ``teacher.path``. Unused for
            class-conditional students.
        out_dir: the directory to write; must be absent or empty, unless ``overwrite`` and it is a
            previous export.
        steps: the K the export documents (default: the generator's); any K works at sampling time.
    Returns:
        ``out_dir``.
    """
    info = _student_from_generator(student) if isinstance(student, Generator) else _student_from_dir(student)
    steps = int(steps or info.steps)
    if info.class_name not in TEXT_BACKBONES + CLASS_BACKBONES + ("SD3Transformer2DModel",):
        raise StepdistillError(f"cannot export a {info.class_name} student to diffusers: supported backbones "
                               f"are {', '.join(TEXT_BACKBONES + CLASS_BACKBONES)}")
    _check_consistency_export(info)
    if info.schedule.kind != "vp":
        raise StepdistillError(f"format=diffusers export of flow-matching students ({info.class_name}) is not "
                               "yet supported (StableDiffusion3Pipeline does not pass its generator to the "
                               "scheduler's stochastic step, so multi-step samples are not reproducible per seed)")
    out = check_out_dir(out_dir, overwrite)
    with staged_directory(out) as tmp:
        if info.class_name in TEXT_BACKBONES:
            teacher = teacher_dir if teacher_dir is not None else info.teacher_dir
            pipeline = _write_text_export(info, teacher, tmp)
        else:
            pipeline = None
            info.write_unet(tmp / "unet")
        info.scheduler().save_config(tmp / "scheduler")
        _write_notes(tmp, out, info, pipeline, steps)
    return out


def _check_consistency_export(info: _Student) -> None:
    """What LCMScheduler cannot reproduce: deterministic multistep-CD sampling, and a class UNet's
    guidance embedding (diffusers' UNet2DModel has no ``timestep_cond``)."""
    if not info.consistency:
        return
    if info.consistency.get("sampler") == "ode":
        raise StepdistillError("export of a multistep-CD student (generator.sampler=ode: deterministic DDIM jumps) "
                               "is not yet supported; LCM students (sampler=renoise) export with LCMScheduler")
    if info.class_name in CLASS_BACKBONES and info.unet_config.get("time_cond_proj_dim"):
        raise StepdistillError("a UNet2DModel student with a guidance embedding cannot be exported: diffusers' "
                               "UNet2DModel takes no timestep_cond (train with generator.guidance_embedding_dim=null)")


def _write_text_export(info: _Student, teacher_dir: str | Path | None, tmp: Path) -> str:
    """Copy the teacher pipeline's components but unet/ and scheduler/; write the student's unet."""
    from stepdistill.denoisers.loading import resolve_local_dir

    if teacher_dir is None:
        raise StepdistillError("a text-to-image student needs the teacher directory (its text encoders, "
                               "tokenizers and VAE): pass teacher_dir / set teacher.path in the run config")
    root = resolve_local_dir(teacher_dir)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise StepdistillError(f"teacher {str(root)!r} has no model_index.json: a diffusers pipeline "
                               "directory (StableDiffusionPipeline / StableDiffusionXLPipeline) is needed")
    index = json.loads(index_file.read_text())
    xl = isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    teacher_unet = json.loads((root / "unet" / "config.json").read_text()) if (root / "unet").is_dir() else {}
    for key in ("in_channels", "cross_attention_dim", "addition_embed_type"):
        if key in teacher_unet and teacher_unet.get(key) != info.unet_config.get(key):
            raise StepdistillError(f"the student's unet does not fit the teacher pipeline {str(root)!r}: "
                                   f"{key} is {info.unet_config.get(key)!r}, the teacher's {teacher_unet[key]!r}")
    for name, entry in index.items():
        if name.startswith("_") or name in ("unet", "scheduler") or not isinstance(entry, list):
            continue
        if entry[0] is not None and (root / name).is_dir():
            shutil.copytree(root / name, tmp / name)
    info.write_unet(tmp / "unet")
    index.update(_class_name=pipeline, unet=["diffusers", "UNet2DConditionModel"],
                 scheduler=["diffusers", "LCMScheduler"])
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return pipeline


def _guidance_note(info: _Student, pipeline: str) -> str:
    if info.guidance_scale != GUIDANCE_SCALE:
        return (f"`guidance_scale={info.guidance_scale}` is the scale the student reproduces in one forward: the "
                "pipeline gives it to the UNet's guidance embedding (`time_cond_proj_dim`) and runs no CFG")
    return f"`guidance_scale={GUIDANCE_SCALE}` turns classifier-free guidance off (the {pipeline} default runs it)"


def _write_notes(tmp: Path, out: Path, info: _Student, pipeline: str | None, steps: int) -> None:
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
                 + _guidance_note(info, pipeline) + "; a teacher safety checker, if copied, may blank images (pass `safety_checker=None` "
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

