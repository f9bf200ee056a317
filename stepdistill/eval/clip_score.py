"""CLIP score of images against prompts: torchmetrics' ``CLIPScore`` over a local CLIP directory.

CLIP score (Hessel et al. 2021, "CLIPScore", Eq. 1 with w = 100) is ``100 * cos(E_I, E_C)`` of a
CLIP model's projected image and text embeddings. torchmetrics' ``CLIPScore`` averages it over all
pairs and clips the *mean* at 0 (``max(mean_i 100 cos_i, 0)``); :func:`clip_score` returns exactly
that number and :func:`direct_clip_score` computes it again from the model's projections (the
equivalence test); :func:`clip_pair_scores` gives the unclipped per-pair values.

Made for transformers 5 and offline machines:

- the model and processor load from a local directory (:func:`load_clip`: ``CLIPModel`` +
  ``CLIPProcessor`` saved with ``save_pretrained``), never from a hub id, and reach torchmetrics
  through its documented ``model_name_or_path=callable`` form;
- transformers 5's ``get_image_features`` / ``get_text_features`` return output objects; the model
  is wrapped so they return the projected embedding tensors [N, D] torchmetrics expects;
- prompts are truncated to the text model's length keeping the end-of-text token (CLIP pools at it;
  torchmetrics' own truncation would cut it off).

Images: a uint8 tensor [N, 3, H, W] in [0, 255], a float tensor [N, 3, H, W] in [0, 1] (rounded to
uint8, as saving PNGs would), a list of such [3, H, W] tensors, or a list of PIL images (any size:
the CLIP processor resizes and crops them). One-channel images are repeated to RGB.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor
from transformers.utils import logging

from stepdistill.errors import StepdistillError
from stepdistill.eval.images import IMAGE_EXTENSIONS

#: what ``stepdistill sample`` writes next to its PNGs (``files`` and ``prompts``, in order)
SAMPLES_JSON = "samples.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Clip:
    """A loaded CLIP: ``model`` (a transformers ``CLIPModel``, eval mode), ``processor`` (its
    ``CLIPProcessor``) and ``path`` (the directory it came from, or None)."""

    model: nn.Module
    processor: Any
    path: Path | None = None

    @property
    def max_length(self) -> int:
        """Tokens per prompt: the tokenizer's and the text model's positions, whichever is smaller."""
        positions = int(self.model.config.text_config.max_position_embeddings)
        tokenizer = getattr(self.processor, "tokenizer", None)
        limit = int(getattr(tokenizer, "model_max_length", positions) or positions)
        return min(positions, limit)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers at error level (no torchvision fallback notice for the PIL image processor) and
    without its weight-loading progress bar."""
    before, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(before)
        if bars:
            logging.enable_progress_bar()


def check_clip_dir(clip_dir: str | Path) -> Path:
    """``clip_dir`` as a path after cheap checks (no loading): it exists, is not a hub id, and its
    ``config.json`` names ``model_type: clip``; a one-line ``StepdistillError`` otherwise."""
    path = Path(str(clip_dir)).expanduser()
    if not path.exists():
        if _HUB_ID.match(str(clip_dir)):
            raise StepdistillError(
                f"clip={clip_dir!r} looks like a model hub id and hubs are not reached: download it to a local "
                f"directory (e.g. `hf download {clip_dir} --local-dir DIR`) and pass clip=DIR")
        raise StepdistillError(f"CLIP directory not found: {str(path)!r}; pass clip=DIR, a local directory "
                               "with a CLIPModel and CLIPProcessor saved by save_pretrained")
    config = path / "config.json"
    model_type = None
    if path.is_dir() and config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (OSError, json.JSONDecodeError):
            model_type = None
    if model_type != "clip":
        found = "no config.json" if not config.is_file() else f"model_type {model_type!r}"
        raise StepdistillError(f"{str(path)!r} holds no CLIP model ({found}); pass clip=DIR, a directory where "
                               "CLIPModel and CLIPProcessor were saved with save_pretrained")
    return path


def load_clip(clip_dir: str | Path) -> Clip:
    """A ``CLIPModel`` and ``CLIPProcessor`` from a local directory (``save_pretrained`` of both:
    ``config.json`` with ``model_type: clip``, weights, tokenizer and image-processor files).

    A missing directory, a hub id (``openai/clip-vit-large-patch14``: model hubs are not reached) or a
    directory without a CLIP config is a one-line ``StepdistillError`` (:func:`check_clip_dir`).
    """
    path = check_clip_dir(clip_dir)
    try:
        with _quiet_transformers():
            processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepdistillError(f"cannot load the CLIP model or processor from {str(path)!r} ({first}); it needs "
                               "the files of CLIPModel.save_pretrained and CLIPProcessor.save_pretrained") from None
    return Clip(model.eval(), processor, path)


def _as_clip(clip: str | Path | Clip) -> Clip:
    return clip if isinstance(clip, Clip) else load_clip(clip)


# --------------------------------------------------------------------------- torchmetrics glue
def _projected(output: Any) -> Tensor:
    """The projected embeddings [N, D]: transformers 5 returns an output object whose
    ``pooler_output`` holds them; older versions return the tensor itself."""
    return output if isinstance(output, Tensor) else output.pooler_output


class FeatureTensors(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return tensors [N, D]
    (the projected embeddings), as torchmetrics' ``CLIPScore`` expects, on transformers 5 too."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.clip = model

    @property
    def config(self) -> Any:  # torchmetrics reads text_config.max_position_embeddings
        return self.clip.config

    def get_image_features(self, pixel_values: Tensor, **kwargs: Any) -> Tensor:
        return _projected(self.clip.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return _projected(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


class TruncatingProcessor:
    """A ``CLIPProcessor`` that truncates prompts to ``max_length`` tokens, end-of-text kept."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor, self.max_length = processor, int(max_length)

    def __call__(self, *args: Any, text: Any = None, images: Any = None, **kwargs: Any) -> Any:
        if text is not None:
            kwargs = {**kwargs, "truncation": True, "max_length": self.max_length}
        with _quiet_transformers():
            return self.processor(*args, text=text, images=images, **kwargs)


def torchmetrics_clip_score(clip: str | Path | Clip) -> Any:
    """torchmetrics' ``CLIPScore`` metric around a local CLIP (no hub access)."""
    loaded = _as_clip(clip)
    wrapped = FeatureTensors(loaded.model)
    processor = TruncatingProcessor(loaded.processor, loaded.max_length)
    return CLIPScore(model_name_or_path=lambda: (wrapped, processor))


# --------------------------------------------------------------------------- images
def image_tensors(images: Tensor | Sequence[Any]) -> list[Tensor]:
    """Images as a list of uint8 [3, H, W] tensors on the CPU (see the module docstring for inputs)."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4:
            raise StepdistillError(f"images must be [N, C, H, W] (uint8 in [0, 255] or float in [0, 1]); "
                                   f"got shape {list(images.shape)}")
        items: list[Any] = list(images)
    else:
        items = list(images)
    return [_uint8_rgb(item) for item in items]


def _uint8_rgb(image: Any) -> Tensor:
    if not isinstance(image, Tensor):  # PIL
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)
    image = image.detach().cpu()
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise StepdistillError(f"each image must be [3, H, W] or [1, H, W]; got shape {list(image.shape)}")
    if image.is_floating_point():
        low, high = float(image.min()), float(image.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise StepdistillError(f"float images must be in [0, 1] (got values in [{low:.3g}, {high:.3g}]); "
                                   "map [-1, 1] samples with (x + 1) / 2, or pass uint8 images")
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    elif image.dtype != torch.uint8:
        image = image.clamp(0, 255).to(torch.uint8)
    return image.expand(3, -1, -1).contiguous() if image.shape[0] == 1 else image


def _check_pairs(images: list[Tensor], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise StepdistillError(f"{len(images)} images but {len(prompts)} prompts: CLIP score pairs image i "
                               "with prompt i, so the counts must match")
    if not images:
        raise StepdistillError("no images to score")


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


# --------------------------------------------------------------------------- scores
def clip_score(images: Tensor | Sequence[Any], prompts: Sequence[str], clip: str | Path | Clip, *,
               batch_size: int = 64, progress: bool = True, device: str | torch.device | None = None) -> float:
    """The CLIP score of ``images`` against ``prompts`` (image i with prompt i): torchmetrics'
    ``CLIPScore``, ``max(mean_i 100 cos(E_I_i, E_C_i), 0)``.

    Args:
        images: uint8 [N, 3, H, W], float [N, 3, H, W] in [0, 1], or a list of [3, H, W] tensors or
            PIL images.
        prompts: N prompts.
        clip: a local CLIP directory (:func:`load_clip`) or a loaded :class:`Clip`.
        batch_size: pairs per forward.
        progress: show a progress bar.
        device: where the model runs (default: CUDA when available).
    """
    tensors = image_tensors(images)
    _check_pairs(tensors, prompts)
    metric = torchmetrics_clip_score(clip)
    dev = _device(device)
    metric = metric.to(dev)
    starts = range(0, len(tensors), max(1, int(batch_size)))
    with torch.no_grad():
        for start in tqdm(starts, desc="CLIP score", unit="batch", disable=not progress):
            chunk = [t.to(dev) for t in tensors[start:start + batch_size]]
            metric.update(chunk, [str(p) for p in prompts[start:start + batch_size]])
        return float(metric.compute())


def clip_pair_scores(images: Tensor | Sequence[Any], prompts: Sequence[str], clip: str | Path | Clip, *,
                     batch_size: int = 64, device: str | torch.device | None = None) -> Tensor:
    """``100 * cos`` of each pair's projected CLIP embeddings [N] (float64, unclipped), computed
    directly: processor -> vision / text transformer -> pooled state -> projection -> cosine."""
    loaded = _as_clip(clip)
    tensors = image_tensors(images)
    _check_pairs(tensors, prompts)
    dev = _device(device)
    model = loaded.model.to(dev)
    processor = TruncatingProcessor(loaded.processor, loaded.max_length)
    scores = []
    with torch.no_grad():
        for start in range(0, len(tensors), max(1, int(batch_size))):
            pixels = processor(images=tensors[start:start + batch_size], return_tensors="pt")["pixel_values"]
            text = processor(text=[str(p) for p in prompts[start:start + batch_size]], return_tensors="pt",
                             padding=True)
            image_embeds = model.visual_projection(model.vision_model(pixel_values=pixels.to(dev)).pooler_output)
            text_embeds = model.text_projection(model.text_model(
                input_ids=text["input_ids"].to(dev), attention_mask=text["attention_mask"].to(dev)).pooler_output)
            cosine = torch.nn.functional.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=-1)
            scores.append(100 * cosine.cpu())
    return torch.cat(scores)


def direct_clip_score(images: Tensor | Sequence[Any], prompts: Sequence[str], clip: str | Path | Clip, *,
                      batch_size: int = 64, device: str | torch.device | None = None) -> float:
    """:func:`clip_score` computed directly (no torchmetrics): the mean of :func:`clip_pair_scores`,
    clipped at 0."""
    pairs = clip_pair_scores(images, prompts, clip, batch_size=batch_size, device=device)
    return max(float(pairs.mean()), 0.0)


# --------------------------------------------------------------------------- directories
def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped) or a ``samples.json`` written by
    ``stepdistill sample`` (its ``prompts``)."""
    path = Path(str(path))
    if not path.is_file():
        raise StepdistillError(f"prompts file not found: {str(path)!r} (one prompt per line, or a samples.json "
                               "written by `stepdistill sample`)")
    if path.suffix == ".json":
        prompts = _samples_record(path).get("prompts")
        if not prompts:
            raise StepdistillError(f"{str(path)!r} lists no prompts (a class-conditional run's samples?); "
                                   "pass prompts=FILE with one prompt per line")
        return [str(p) for p in prompts]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _samples_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StepdistillError(f"cannot read {str(path)!r} as JSON: {e}") from None
    if not isinstance(record, dict):
        raise StepdistillError(f"{str(path)!r} is not a samples.json record (a JSON object)")
    return record


def image_files(images_dir: str | Path) -> list[Path]:
    """The images to score in ``images_dir``: the ``files`` its ``samples.json`` lists (``stepdistill
    sample`` output, in sample order: its grid.png is left out), else every image file sorted by name."""
    folder = Path(str(images_dir))
    if not folder.is_dir():
        raise StepdistillError(f"images directory not found: {str(folder)!r}")
    marker = folder / SAMPLES_JSON
    if marker.is_file():
        files = _samples_record(marker).get("files") or []
        paths = [folder / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise StepdistillError(f"{str(marker)!r} lists {missing[0]} but {str(folder)!r} lacks it; sample again")
        if paths:
            return paths
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise StepdistillError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(folder)!r}")
    return paths


def score_image_dir(images_dir: str | Path, prompts: str | Path | Sequence[str] | None,
                    clip: str | Path | Clip, *, batch_size: int = 64, progress: bool = True,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """CLIP score of an image directory against prompts; returns ``{"clip_score", "n"}``.

    Images are :func:`image_files` (sample order for ``stepdistill sample`` output, else sorted by
    name) and image i pairs with prompt i. ``prompts``: a text file (one per line), a samples.json,
    a list of prompts, or None to use the ``samples.json`` in ``images_dir``.
    """
    paths, texts = image_prompt_pairs(images_dir, prompts)
    images = []
    for p in paths:
        with Image.open(p) as image:
            images.append(image.convert("RGB"))
    score = clip_score(images, texts, clip, batch_size=batch_size, progress=progress, device=device)
    return {"clip_score": score, "n": len(paths)}


def image_prompt_pairs(images_dir: str | Path, prompts: str | Path | Sequence[str] | None
                       ) -> tuple[list[Path], list[str]]:
    """The image files and their prompts (see :func:`score_image_dir`); counts checked."""
    paths = image_files(images_dir)
    if prompts is None:
        marker = Path(str(images_dir)) / SAMPLES_JSON
        if not marker.is_file():
            raise StepdistillError(f"prompts=FILE is required: {str(images_dir)!r} has no samples.json listing "
                                   "prompts")
        texts = read_prompts(marker)
    elif isinstance(prompts, (str, Path)):
        texts = read_prompts(prompts)
    else:
        texts = [str(p) for p in prompts]
    if len(paths) != len(texts):
        raise StepdistillError(f"{len(paths)} images in {str(images_dir)!r} but {len(texts)} prompts: image i "
                               "pairs with prompt i, so the counts must match")
    return paths, texts
