"""Render the captioned shapes images shipped for the tiny text stacks' real-data runs.

Each prompt of ``stepdistill/assets/prompts/shapes.txt`` ("a red circle", "a green square and a red
star", "a small blue circle on a line", ...) becomes a few small RGB images drawn with PIL (jittered
position and size), written with a ``metadata.jsonl`` in the imagefolder layout
(``stepdistill.data.images.ImageCaptionData``):

    python scripts/make_shapes_images.py [OUT] [--size 16] [--per-prompt 4]

(default OUT: stepdistill/assets/shapes_images).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60)}
SHAPES = ("circle", "square", "triangle", "star")


def parse(prompt: str) -> list[tuple[str, str, float]]:
    """(shape, colour, relative size) for each shape the prompt names, in order."""
    words, found, colour, scale = prompt.split(), [], "red", 0.5
    for w in words:
        if w in COLORS:
            colour = w
        elif w in ("big", "small"):
            scale = 0.7 if w == "big" else 0.3
        elif w in SHAPES:
            found.append((w, colour, scale))
            scale = 0.5
    return found


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: tuple, cx: float, cy: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:  # a five-pointed star
        points = [(cx + (r if i % 2 == 0 else r / 2.5) * math.sin(i * math.pi / 5),
                   cy - (r if i % 2 == 0 else r / 2.5) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=colour)


def render(prompt: str, size: int, rng: random.Random) -> Image.Image:
    """One image of ``prompt`` on a light background (a grey line under the shapes when asked)."""
    canvas = 4 * size  # draw large, then downsample (anti-aliasing)
    image = Image.new("RGB", (canvas, canvas), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    if "line" in prompt.split():
        y = canvas * rng.uniform(0.75, 0.85)
        draw.line((0, y, canvas, y), fill=(90, 90, 90), width=max(2, canvas // 16))
    shapes = parse(prompt)
    for i, (shape, colour, scale) in enumerate(shapes):
        cx = canvas * ((i + 0.5) / len(shapes) + rng.uniform(-0.08, 0.08))
        cy = canvas * rng.uniform(0.4, 0.55)
        r = canvas * scale / (2 * len(shapes)) * rng.uniform(0.85, 1.15)
        draw_shape(draw, shape, COLORS[colour], cx, cy, r)
    return image.resize((size, size), Image.LANCZOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "stepdistill" / "assets" / "shapes_images")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--per-prompt", type=int, default=4)
    args = parser.parse_args()
    lines = (ROOT / "stepdistill" / "assets" / "prompts" / "shapes.txt").read_text().splitlines()
    prompts = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    rng = random.Random(0)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        for j in range(args.per_prompt):
            name = f"{i:02d}_{j}.png"
            render(prompt, args.size, rng).save(args.out / name)
            rows.append({"file_name": name, "text": prompt})
    (args.out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} images written to {args.out}")


if __name__ == "__main__":
    main()
