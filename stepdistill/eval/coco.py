"""COCO text-to-image protocols: captions -> a run's student -> FID (Inception) + CLIP score.

A protocol (``configs/eval/<name>.yaml``, :class:`CocoProtocol`) names a local captions file (COCO's
``captions_val2014.json`` / ``captions_val2017.json``) and its image folder, how many images to use
and at which resolution the images are compared:

- the images: a seeded sample of ``num_images`` images of the captions file (all of them when
  ``num_images`` is null), each with its first caption (lowest annotation id);
- the reference: those images centre-cropped to a square and resized (PIL bicubic) to
  ``eval_resolution``, written once as PNGs under ``$STEPDISTILL_CACHE/coco/`` (their FID statistics
  are then cached by ``stepdistill.eval.fid``);
- the student's images: generated in batches from the captions (batch ``i`` seeded ``seed + i``),
  resized (PIL bicubic) from the student's resolution (``generate_resolution``: 512 for SD1.5) to
  ``eval_resolution`` and written as ``<run>/eval/<protocol>/images/NNNNNN.png``; an interrupted
  evaluation resumes at the first missing batch;
- FID between the two folders (the ``stepdistill.eval.fid`` protocol) and the CLIP score of the
  student's images against their captions (``stepdistill.eval.clip_score``), written to
  ``<run>/eval/<protocol>/coco_metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm

from stepdistill.cache import cache_dir
from stepdistill.data.prompts import PromptEncoder
from stepdistill.errors import StepdistillError
from stepdistill.eval.clip_score import image_tensors, load_clip, torchmetrics_clip_score
from stepdistill.eval.fid import compute_fid
from stepdistill.eval.images import load_image
from stepdistill.pipelines.few_step import decode_latents, sample_student
from stepdistill.pipelines.runs import load_run

#: images held in memory at once for the CLIP score (30k images at 256 px would be 5.9 GB)
CLIP_CHUNK = 1000
CLIP_BATCH = 64


@dataclass
class CocoProtocol:
    """One COCO evaluation protocol.

    Args:
        name: the protocol's name (``coco2014_30k``, ``coco2017_5k``, ...).
        captions: the captions JSON (COCO's ``annotations/captions_val20XX.json``).
        images: the folder of the captioned images (COCO's ``val20XX/``).
        num_images: images (and captions) to evaluate; null: all of the file's images.
        generate_resolution: the resolution the student is expected to generate at (recorded; a
            student of another resolution is evaluated at its own and the difference noted).
        eval_resolution: both sets are resized to this before the FID protocol's own 299 resize.
        seed: seeds the image sample and the student's noise.
        feature: the FID's features (``inception`` for published numbers).
    """

    name: str
    captions: str | None = None
    images: str | None = None
    num_images: int | None = 30000
    generate_resolution: int = 512
    eval_resolution: int = 256
    seed: int = 0
    feature: str = "inception"

    def check(self) -> tuple[Path, Path]:
        """The captions file and the image folder, or a one-line error naming what is missing."""
        for key in ("captions", "images"):
            if not getattr(self, key):
                raise StepdistillError(f"the {self.name} protocol needs {key}=PATH (COCO's "
                                       f"{'annotations/captions_valYYYY.json' if key == 'captions' else 'valYYYY/ folder'})")
        captions, images = Path(str(self.captions)), Path(str(self.images))
        if not captions.is_file():
            raise StepdistillError(f"captions file not found: {str(captions)!r} (COCO's captions_valYYYY.json)")
        if not images.is_dir():
            raise StepdistillError(f"image folder not found: {str(images)!r} (COCO's valYYYY/ folder)")
        return captions, images


def select_pairs(protocol: CocoProtocol) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of the protocol: a seeded sample of the captioned images, sorted by
    image id, each with its first caption."""
    captions_file, folder = protocol.check()
    try:
        data = json.loads(captions_file.read_text())
        files = {int(img["id"]): str(img["file_name"]) for img in data["images"]}
        first: dict[int, tuple[int, str]] = {}
        for ann in data["annotations"]:
            image_id, ann_id = int(ann["image_id"]), int(ann.get("id", 0))
            if image_id in files and (image_id not in first or ann_id < first[image_id][0]):
                first[image_id] = (ann_id, str(ann["caption"]).strip())
    except (ValueError, KeyError, TypeError) as e:
        raise StepdistillError(f"{str(captions_file)!r} is not a COCO captions file ({type(e).__name__}: {e}); "
                               "expected {\"images\": [{\"id\", \"file_name\"}], \"annotations\": "
                               "[{\"image_id\", \"caption\"}]}") from None
    ids = sorted(first)
    wanted = len(ids) if protocol.num_images is None else int(protocol.num_images)
    if wanted > len(ids) or wanted < 1:
        raise StepdistillError(f"the {protocol.name} protocol asks for {wanted} images but {str(captions_file)!r} "
                               f"captions {len(ids)}; set num_images=N (N <= {len(ids)})")
    chosen = sorted(random.Random(protocol.seed).sample(ids, wanted)) if wanted < len(ids) else ids
    pairs = [(folder / files[i], first[i][1]) for i in chosen]
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing:
        raise StepdistillError(f"{len(missing)} captioned images are missing from {str(folder)!r} "
                               f"(first: {missing[0]!r}); is it the folder of {captions_file.name}?")
    return pairs


def square_resize(image, size: int):
    """A PIL image centre-cropped to a square and resized to ``size`` (bicubic), in RGB."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def prepare_reference(pairs: list[tuple[Path, str]], protocol: CocoProtocol, progress: bool = True) -> Path:
    """The reference folder (cropped and resized real images), written once per (images, size)."""
    key = hashlib.sha256(json.dumps([protocol.eval_resolution, [str(p) for p, _ in pairs]]).encode())
    out = cache_dir() / "coco" / f"{protocol.name}-{protocol.eval_resolution}-{key.hexdigest()[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, _) in enumerate(tqdm(pairs, desc=f"{protocol.name} reference", disable=not progress)):
        target = out / f"{i:06d}.png"
        if not target.is_file():
            with Image.open(path) as image:
                _save_atomic(square_resize(image, protocol.eval_resolution), target)
    return out


def _save_atomic(image, target: Path) -> None:
    tmp = target.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(target)


def generate_images(student, prompts: list[str], out: Path, *, size: int, steps: int | None = None,
                    seed: int = 0, batch_size: int = 16, progress: bool = True) -> tuple[int, int]:
    """The student's images for ``prompts`` as ``out/NNNNNN.png`` resized to ``size``; batches whose
    files all exist are skipped. Returns (the student's own resolution, batches generated now)."""
    out.mkdir(parents=True, exist_ok=True)
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    todo = [(b, rows) for b, rows in enumerate(batches) if not all((out / f"{r:06d}.png").is_file() for r in rows)]
    native, made = None, 0
    sampler = _TextSampler(student) if todo else None
    for b, rows in tqdm(todo, desc="student images", disable=not progress):
        images = sampler([prompts[r] for r in rows], steps, seed + b)
        native = images.shape[1]
        for r, array in zip(rows, images, strict=True):
            picture = Image.fromarray(array)
            if picture.size != (size, size):
                picture = picture.resize((size, size), Image.Resampling.BICUBIC)
            _save_atomic(picture, out / f"{r:06d}.png")
        made += 1
    if native is None:  # all present: read one back
        with Image.open(out / f"{0:06d}.png") as first:
            native = first.size[0]
    return int(native), made


class _TextSampler:
    """prompts -> uint8 [B, H, W, 3] images from a run's text-to-image student."""

    def __init__(self, student) -> None:
        name = type(student.generator.denoiser.backbone).__name__
        if name not in ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"):
            raise StepdistillError(f"COCO protocols evaluate text-to-image students; {str(student.path)!r} "
                                   f"holds a {name} student (use `stepdistill eval run=DIR`)")
        teacher = student.teacher_path
        if teacher is None or not teacher.is_dir():
            raise StepdistillError(f"the run's teacher.path ({str(teacher)!r}) is not a directory: its text "
                                   "encoders and VAE are needed")
        self.generator = student.generator
        self.device = next(self.generator.parameters()).device
        self.encoder = PromptEncoder.from_pretrained(teacher).to(self.device)
        self.vae = AutoencoderKL.from_pretrained(str(teacher / "vae")).to(self.device)

    @torch.no_grad()
    def __call__(self, prompts: list[str], steps: int | None, seed: int) -> np.ndarray:
        latents = sample_student(self.generator, self.encoder.encode(prompts).to(self.device), steps=steps, seed=seed)
        images = decode_latents(self.vae, latents).float().cpu().permute(0, 2, 3, 1).numpy()
        return (images * 255).round().astype(np.uint8)


def evaluate_coco(run_dir: str | Path, protocol: CocoProtocol, *, clip_dir: str | None,
                  inception_path: str | None = None, steps: int | None = None, batch_size: int = 16,
                  progress: bool = True) -> dict[str, Any]:
    """Run ``protocol`` on the run's student; writes and returns ``coco_metrics.json``."""
    pairs = select_pairs(protocol)
    clip = _check_clip(clip_dir)
    student = load_run(run_dir)
    student.generator.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    out = student.path / "eval" / protocol.name
    prompts = [caption for _, caption in pairs]
    native, _ = generate_images(student, prompts, out / "images", size=protocol.eval_resolution, steps=steps,
                                seed=protocol.seed, batch_size=batch_size, progress=progress)
    reference = prepare_reference(pairs, protocol, progress)
    fid = compute_fid(reference, out / "images", protocol.feature, inception_path=inception_path,
                      progress=progress)
    metrics: dict[str, Any] = {"protocol": asdict(protocol), "run": str(student.path),
                               "steps": steps or student.generator.steps, "student_resolution": native,
                               "fid": fid["fid"], "fid_details": fid}
    if clip is not None:
        metrics["clip_score"], metrics["clip"] = _clip_score(out / "images", prompts, clip, progress), str(clip)
    (out / "coco_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def _clip_score(folder: Path, prompts: list[str], clip_dir: Path, progress: bool) -> float:
    """torchmetrics' CLIP score of the PNGs ``NNNNNN.png`` of ``folder`` against ``prompts``, read
    ``CLIP_CHUNK`` images at a time and scored in batches of ``CLIP_BATCH``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metric = torchmetrics_clip_score(load_clip(clip_dir)).to(device)
    with tqdm(total=len(prompts), desc="CLIP score", disable=not progress) as bar:
        for start in range(0, len(prompts), CLIP_CHUNK):
            rows = range(start, min(start + CLIP_CHUNK, len(prompts)))
            tensors = image_tensors(_read_images(folder, rows))
            for i in range(0, len(rows), CLIP_BATCH):
                metric.update([t.to(device) for t in tensors[i:i + CLIP_BATCH]],
                              prompts[start + i:start + i + CLIP_BATCH])
                bar.update(len(tensors[i:i + CLIP_BATCH]))
    return float(metric.compute())


def _check_clip(clip_dir: str | None) -> Path | None:
    if clip_dir is None:
        return None
    path = Path(str(clip_dir))
    if not path.is_dir():
        raise StepdistillError(f"CLIP directory not found: {str(path)!r} (a local CLIPModel directory, e.g. "
                               "a download of openai/clip-vit-large-patch14)")
    return path


def _read_images(folder: Path, rows: range) -> torch.Tensor:
    """The PNGs ``NNNNNN.png`` of ``folder`` for ``rows`` as uint8 [N, 3, H, W]."""
    arrays = [load_image(folder / f"{i:06d}.png") for i in rows]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
