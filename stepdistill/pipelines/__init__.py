"""Few-step sampling (``FewStepPipeline``, ``sample_student``) and diffusers export (``export_diffusers``).

See ``few_step`` for the RNG order that makes a seed reproducible and ``export`` for the scheduler
config that lets a plain diffusers pipeline reproduce the samples.
"""

from stepdistill.pipelines.export import (
    GUIDANCE_SCALE,
    export_diffusers,
    few_step_scheduler,
    lcm_timesteps,
)
from stepdistill.pipelines.few_step import (
    FewStepPipeline,
    StudentRun,
    decode_latents,
    generate,
    load_run,
    pixels_to_unit,
    sample_student,
)

__all__ = ["GUIDANCE_SCALE", "FewStepPipeline", "StudentRun", "decode_latents", "export_diffusers",
           "few_step_scheduler", "generate", "lcm_timesteps", "load_run", "pixels_to_unit", "sample_student"]
