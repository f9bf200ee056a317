"""Few-step sampling (``FewStepPipeline``, ``sample_student``) and diffusers export (``export_diffusers``).

Loading a run's student is ``runs`` (``load_run``). See ``few_step`` for the RNG order that makes a
seed reproducible and ``export`` / ``scheduler`` for the scheduler config that lets a plain diffusers
pipeline reproduce the samples.
"""

from stepdistill.pipelines.export import export_diffusers
from stepdistill.pipelines.few_step import (
    FewStepPipeline,
    decode_latents,
    generate,
    pixels_to_unit,
    sample_student,
)
from stepdistill.pipelines.runs import StudentRun, load_run
from stepdistill.pipelines.scheduler import GUIDANCE_SCALE, few_step_scheduler, lcm_timesteps

__all__ = ["GUIDANCE_SCALE", "FewStepPipeline", "StudentRun", "decode_latents", "export_diffusers",
           "few_step_scheduler", "generate", "lcm_timesteps", "load_run", "pixels_to_unit", "sample_student"]
