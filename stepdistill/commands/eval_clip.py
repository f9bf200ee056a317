"""``stepdistill eval-clip images=DIR prompts=FILE clip=CLIP_DIR [out=JSON] [batch_size=N]``: CLIP score.

Scores the images of ``images`` against ``prompts`` (image i with prompt i; see
``stepdistill.eval.clip_score.score_image_dir``): a text file with one prompt per line, or a
``samples.json`` of ``stepdistill sample`` (when ``images`` holds one, ``prompts`` may be left out).
``clip`` is a local directory with a ``CLIPModel`` and ``CLIPProcessor`` (``save_pretrained``); model
hubs are never reached. Prints ``{"clip_score", "n", "clip"}`` and writes it to ``out`` if given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepdistill.args import parse_args
from stepdistill.errors import StepdistillError
from stepdistill.eval.clip_score import (
    check_clip_dir,
    image_prompt_pairs,
    load_clip,
    score_image_dir,
)

KEYS: dict[str, str] = {"images": "str", "prompts": "str", "clip": "str", "out": "str", "batch_size": "int",
                        "device": "str"}


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """Score, print and (with ``out``) write the result; returns it."""
    args = parse_args(overrides, KEYS, "eval-clip")
    for key in ("images", "clip"):
        if not args.get(key):
            raise StepdistillError(f"{key}= is required: stepdistill eval-clip images=DIR prompts=FILE clip=CLIP_DIR")
    batch_size = int(args.get("batch_size", 64))
    if batch_size < 1:
        raise StepdistillError(f"batch_size must be >= 1; got {batch_size}")
    out = Path(args["out"]) if args.get("out") else None
    if out is not None and out.is_dir():
        raise StepdistillError(f"out {str(out)!r} is a directory; pass a JSON file path")
    check_clip_dir(args["clip"])  # bad inputs fail before the model loads
    image_prompt_pairs(args["images"], args.get("prompts"))
    clip = load_clip(args["clip"])
    scored = score_image_dir(args["images"], args.get("prompts"), clip, batch_size=batch_size,
                             device=args.get("device"))
    result = {"clip_score": scored["clip_score"], "n": scored["n"], "clip": str(clip.path)}
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return result
