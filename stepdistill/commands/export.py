"""``stepdistill export run=DIR format=diffusers [out=DIR] [steps=K] [overwrite=true]``.

``format=diffusers`` writes a directory diffusers loads and samples without stepdistill
(``stepdistill.pipelines.export``): a StableDiffusion(XL)Pipeline for text students, ``unet/`` +
``scheduler/`` for class-conditional ones. ``out`` defaults to ``<run>/export/diffusers``.
``format=lora`` comes with LoRA generators (a later release).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stepdistill.commands.sample import parse_args
from stepdistill.errors import StepdistillError

FORMATS = ("diffusers", "lora")
KEYS = {"run": "str", "format": "str", "out": "str", "steps": "int", "overwrite": "bool", "teacher": "str"}


def run(overrides: Sequence[str]) -> Path:
    """Export a run's student; returns the output directory."""
    from stepdistill.pipelines.export import GUIDANCE_SCALE, export_diffusers

    args = parse_args(overrides, KEYS, "export")
    fmt = args.get("format", "diffusers")
    if fmt == "lora":
        raise StepdistillError("format=lora is not yet supported (it comes with LoRA generators); use "
                               "format=diffusers for a full diffusers directory")
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
    out = Path(args.get("out") or root / "export" / "diffusers")
    written = export_diffusers(root, args.get("teacher"), out, args.get("steps"),
                               overwrite=bool(args.get("overwrite", False)))
    print(f"exported to {written}/ (see README.md there; sample with guidance_scale={GUIDANCE_SCALE})")
    return written
