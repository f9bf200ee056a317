"""``format=adapters``: an AGD run's guidance adapters, for the base model or any checkpoint of it.

The output directory holds ``adapters.safetensors`` and ``adapter_config.json`` (the blocks they
attach to, their sizes and the condition they embed), ``stepdistill_export.json`` and a README with
the loader::

    from stepdistill.denoisers.loading import load_denoiser
    from stepdistill.roles import AdapterGenerator

    denoiser = load_denoiser(BASE_DIR)        # the base, or another checkpoint of it (e.g. run/student)
    guided = AdapterGenerator(denoiser, adapters_path=OUT_DIR, steps=50, guidance_scale=3.0)
    x0 = guided.sample(noise, cond)           # one network forward per step at scale 3

``GuidanceAdapters.load(OUT_DIR, denoiser)`` attaches them to a ``Denoiser`` without a generator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from stepdistill.adapters import CONFIG, WEIGHTS
from stepdistill.errors import StepdistillError
from stepdistill.pipelines.staging import MARKER, check_out_dir, staged_directory


def export_adapters(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Copy a run's trained adapters to ``out_dir`` with notes and a README; returns ``out_dir``."""
    root = Path(run_dir)
    source = root / "student" / "adapters"
    if not (source / WEIGHTS).is_file() or not (source / CONFIG).is_file():
        raise StepdistillError(f"run {str(root)!r} has no guidance adapters (student/adapters/): format=adapters "
                               "exports AGD runs (algorithm agd); use format=diffusers or format=lora")
    config = OmegaConf.load(root / "config.yaml") if (root / "config.yaml").is_file() else OmegaConf.create({})
    generator = config.get("generator") or {}
    notes = {"format": "adapters", "base": str((config.get("teacher") or {}).get("path")),
             "steps": int(generator.get("steps", 50)), "guidance_scale": float(generator.get("guidance_scale", 1.0)),
             "weights": WEIGHTS, "config": CONFIG}
    out = check_out_dir(out_dir, overwrite)
    with staged_directory(out) as tmp:
        for name in (WEIGHTS, CONFIG):
            shutil.copy2(source / name, tmp / name)
        (tmp / MARKER).write_text(json.dumps(notes, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(notes, out))
    return out


def _readme(notes: dict, out: Path) -> str:
    return (f"# Guidance adapters exported by stepdistill (AGD)\n\nAdapters for `{notes['base']}` that reproduce "
            "its classifier-free guidance in one forward per step, at any scale in the trained range.\n\n"
            "```python\nimport torch\nfrom stepdistill.conditioning import Conditioning\n"
            "from stepdistill.denoisers.loading import load_denoiser\nfrom stepdistill.roles import AdapterGenerator\n\n"
            f"denoiser = load_denoiser(\"{notes['base']}\")  # or another checkpoint of the same base\n"
            f"guided = AdapterGenerator(denoiser, adapters_path=\"{out}\", steps={notes['steps']}, "
            f"guidance_scale={notes['guidance_scale']})\n"
            "noise = torch.randn(4, *denoiser.sample_shape)\n"
            "x0 = guided.sample(noise, cond)  # cond: a stepdistill Conditioning (class labels or prompt embeddings)\n"
            "```\n\nInside `guided.adapters.disabled()` the network is the base model again. "
            "`GuidanceAdapters.load(dir, denoiser)` (stepdistill.adapters) attaches the adapters to any "
            "`Denoiser`; they act inside `adapters.active(t, cond.with_guidance(scale))`.\n")
