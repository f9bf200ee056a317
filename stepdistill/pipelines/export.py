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

The parts: ``scheduler`` (the scheduler config and timestep maths), ``staging`` (the output
directory, written aside and swapped in), ``export_notes`` (``stepdistill_export.json`` and README.md);
this module describes the student (``ExportedStudent``) and writes the export.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from stepdistill.denoisers.loading import (
    find_model_dir,
    read_scheduler_config,
    resolve_local_dir,
    schedule_from_config,
)
from stepdistill.errors import StepdistillError
from stepdistill.pipelines.export_notes import write_notes
from stepdistill.pipelines.scheduler import (
    GUIDANCE_SCALE,
    TIMESTEP_SCALING,
    few_step_scheduler,
    generator_timesteps,
    lcm_original_steps,
    lcm_timesteps,
    model_timesteps,
)
from stepdistill.pipelines.staging import MARKER, check_out_dir, staged_directory
from stepdistill.roles import Generator
from stepdistill.schedules import NoiseSchedule, Prediction

#: re-exported: the scheduler maths (``scheduler``), the output directories (``staging``)
__all__ = ["CLASS_BACKBONES", "CONSISTENCY_KEYS", "GUIDANCE_SCALE", "MARKER", "TEXT_BACKBONES", "TIMESTEP_SCALING",
           "ExportedStudent", "check_consistency_export", "check_out_dir", "export_diffusers", "few_step_scheduler",
           "generator_timesteps", "lcm_original_steps", "lcm_timesteps", "model_timesteps", "staged_directory",
           "student_from_dir"]

TEXT_BACKBONES = ("UNet2DConditionModel",)
CLASS_BACKBONES = ("UNet2DModel",)


# --------------------------------------------------------------------------- students
@dataclass
class ExportedStudent:
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


def _student_from_generator(generator: Generator) -> ExportedStudent:
    backbone = getattr(generator.denoiser.backbone, "module", generator.denoiser.backbone)

    def write(dest: Path) -> None:
        backbone.save_pretrained(dest, safe_serialization=True)

    consistency = _consistency_settings(vars(generator)) if hasattr(generator, "solver_steps") else None
    return ExportedStudent(type(backbone).__name__, dict(backbone.config), generator.schedule,
                    generator.denoiser.prediction, getattr(generator.denoiser, "scheduler_config", None),
                    generator.steps, generator.t_max, write, consistency=consistency,
                    timesteps=getattr(generator, "timesteps", None))


def student_from_dir(path: str | Path) -> ExportedStudent:
    """A student directory (unet/ + scheduler/, as ``save_denoiser`` writes) or a run directory."""
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

    return ExportedStudent(unet_config.get("_class_name", "?"), unet_config, schedule, schedule.prediction,
                    scheduler_config, steps, t_max, write, teacher, consistency, timesteps)


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
    info = _student_from_generator(student) if isinstance(student, Generator) else student_from_dir(student)
    steps = int(steps or info.steps)
    if info.class_name not in TEXT_BACKBONES + CLASS_BACKBONES + ("SD3Transformer2DModel",):
        raise StepdistillError(f"cannot export a {info.class_name} student to diffusers: supported backbones "
                               f"are {', '.join(TEXT_BACKBONES + CLASS_BACKBONES)}")
    check_consistency_export(info)
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
        write_notes(tmp, out, info, pipeline, steps)
    return out


def check_consistency_export(info: ExportedStudent) -> None:
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


def _write_text_export(info: ExportedStudent, teacher_dir: str | Path | None, tmp: Path) -> str:
    """Copy the teacher pipeline's components but unet/ and scheduler/; write the student's unet."""
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
