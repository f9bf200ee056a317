"""``stepdistill export run=DIR format=diffusers [out=DIR] [steps=K] [overwrite=true]``.

``format=diffusers`` writes a directory diffusers loads and samples without stepdistill
(``stepdistill.pipelines.export``): a StableDiffusion(XL)Pipeline for text students, ``unet/`` +
``scheduler/`` for class-conditional ones. ``out`` defaults to ``<run>/export/diffusers``.
``format=lora`` writes a LoRA student's adapters for ``pipe.load_lora_weights(out)`` on the
teacher's pipeline (``stepdistill.pipelines.export_lora``); ``out`` defaults to ``<run>/export/lora``.
``format=adapters`` writes an AGD run's guidance adapters and their loader
(``stepdistill.pipelines.export_adapters``); ``out`` defaults to ``<run>/export/adapters``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stepdistill.args import parse_args
from stepdistill.errors import StepdistillError
from stepdistill.pipelines.export import GUIDANCE_SCALE, export_diffusers
from stepdistill.pipelines.export_adapters import export_adapters
from stepdistill.pipelines.export_lora import export_lora

FORMATS = ("diffusers", "lora", "adapters")
KEYS = {"run": "str", "format": "str", "out": "str", "steps": "int", "overwrite": "bool", "teacher": "str"}


def run(overrides: Sequence[str]) -> Path:
    """Export a run's student; returns the output directory."""
    args = parse_args(overrides, KEYS, "export")
    fmt = args.get("format", "diffusers")
    if fmt not in FORMATS:
        raise StepdistillError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not args.get("run"):
        raise StepdistillError("run=DIR is required: the training run directory")
    root = Path(args["run"]).expanduser()
    if not root.is_dir():
        raise StepdistillError(f"run directory not found: {str(root)!r}")
    if not (root / "student").is_dir():
        raise StepdistillError(f"run {str(root)!r} has no student/ directory (is training finished? the "
                               "trainer writes student/ at the end)")
    out = Path(args.get("out") or root / "export" / fmt)
    overwrite = bool(args.get("overwrite", False))
    if fmt == "adapters":
        written = export_adapters(root, out, overwrite=overwrite)
        print(f"exported the guidance adapters to {written}/ (see README.md there for the loader)")
        return written
    if (root / "student" / "adapters").is_dir():
        raise StepdistillError(f"run {str(root)!r} is an AGD run (the base model plus guidance adapters): "
                               "export it with format=adapters")
    if fmt == "lora":
        written = export_lora(root, out, args.get("steps"), overwrite=overwrite)
        print(f"exported the LoRA adapters to {written}/ (see README.md there: load_lora_weights on the teacher's "
              "pipeline, LCMScheduler from its scheduler/)")
        return written
    written = export_diffusers(root, args.get("teacher"), out, args.get("steps"), overwrite=overwrite)
    print(f"exported to {written}/ (see README.md there; sample with guidance_scale={GUIDANCE_SCALE})")
    return written
