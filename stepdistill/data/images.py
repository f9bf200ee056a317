"""Captioned images for text-to-image runs that need real data (the GAN terms, f-distill's ratio).

The folder layout is the "imagefolder" one that diffusers' training scripts read
(``--train_data_dir``): image files next to a ``metadata.jsonl`` with one JSON object per line,
``{"file_name": "0001.png", "text": "a red circle"}``. Images are read when drawn, centre-cropped to a
square and resized to ``resolution``, as float tensors in [-1, 1]; the task
encodes them with the teacher's VAE (``VaeLatents``) into the latents the denoisers see. With
``cache=DIR`` (written by ``stepdistill cache``) the latents and the captions' embeddings come from the
cache instead: no image is read, and neither the VAE nor the text encoders are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor, nn

from stepdistill.data.text_cache import ConditioningCache
from stepdistill.denoisers.loading import resolve_local_dir
from stepdistill.errors import StepdistillError


class ImageCaptionData:
    """Images and their captions from an imagefolder directory.

    Args:
        folder: the directory holding ``metadata.jsonl`` and the images it names.
        resolution: side of the square images the VAE gets (the teacher's pixel size).
        caption_column, image_column: the metadata keys of the caption and of the file name.
        cache: a ``stepdistill cache`` directory of these images' latents and captions' embeddings
            (``stepdistill.data.text_cache``); None: read and encode them at every step.
    """

    def __init__(self, folder: str | None, resolution: int, caption_column: str = "text",
                 image_column: str = "file_name", cache: str | None = None) -> None:
        if folder is None:
            raise StepdistillError("data.folder is required: an imagefolder directory of captioned images "
                                   '(images + metadata.jsonl lines {"file_name": ..., "text": ...})')
        root = Path(str(folder)).expanduser()
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise StepdistillError(f"no metadata.jsonl in {str(root)!r}: data.folder must be an imagefolder "
                                   'directory (images + metadata.jsonl lines {"file_name": ..., "text": ...})')
        rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
        missing = [k for k in (caption_column, image_column) if rows and k not in rows[0]]
        if not rows or missing:
            raise StepdistillError(f"{str(meta)!r} has no rows with keys {caption_column!r} and {image_column!r}")
        self.prompts = [str(r[caption_column]) for r in rows]
        self.file_names = [str(r[image_column]) for r in rows]
        self.files = [root / name for name in self.file_names]
        self.resolution = int(resolution)
        missing_files = [f for f in self.files if not f.is_file()]
        if missing_files:
            raise StepdistillError(f"image listed in metadata.jsonl not found: {str(missing_files[0])!r} "
                                   f"({len(missing_files)} missing)")
        self.cache = None
        if cache is not None:
            self.cache = ConditioningCache(cache)
            self.cache.check_rows(self.cache_rows(), f"the captioned images of data.folder={str(root)!r}")

    def cache_rows(self) -> dict:
        """What the cache's rows are made of: captions, file names and resolution (the images' bytes are
        not hashed: edit an image in place and re-run ``stepdistill cache`` yourself)."""
        return {"captions": self.prompts, "files": self.file_names, "resolution": self.resolution}

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, n: int, generator: torch.Generator, rows: slice = slice(None)) -> tuple[list[str], Tensor]:
        """``n`` (caption, image [3, H, W] in [-1, 1]) pairs drawn uniformly with replacement; only
        ``rows`` of them are returned (and read from disk). With a cache, the images' cached VAE
        latents [C, h, w] (float32) come instead of the pixels."""
        index = torch.randint(len(self.prompts), (n,), generator=generator).tolist()[rows]
        if self.cache is not None:
            return [self.prompts[i] for i in index], self.cache.read("latents", index)
        return [self.prompts[i] for i in index], torch.stack([self.image(i) for i in index])

    def image(self, i: int) -> Tensor:
        """Image ``i`` as [3, resolution, resolution] in [-1, 1] (read from disk on demand, so a large
        folder costs no memory up front)."""
        return _load_image(self.files[i], self.resolution)


def _load_image(path: Path, resolution: int) -> Tensor:
    """[3, resolution, resolution] float32 in [-1, 1]: RGB, centre-cropped to a square, resized."""
    try:
        image = Image.open(path).convert("RGB")
    except OSError as e:
        raise StepdistillError(f"cannot read image {str(path)!r}: {e}") from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


class VaeLatents(nn.Module):
    """Pixels [-1, 1] -> the latents a pipeline's denoiser works on: ``(mean - shift) * scale`` of the
    VAE's posterior (``shift_factor`` is SD3's; 0 for SD1.5 / SDXL), as diffusers' training scripts do
    (they sample the posterior; its mean is used here so a batch is deterministic).

    Args:
        vae: a diffusers ``AutoencoderKL``.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VaeLatents:
        """The ``vae/`` of a local pipeline directory."""
        root = resolve_local_dir(path, "VAE")
        if not (root / "vae" / "config.json").is_file():
            raise StepdistillError(f"no vae/ in {str(root)!r}: real images need the pipeline's VAE")
        return cls(AutoencoderKL.from_pretrained(str(root / "vae")))

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        mean = self.vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean
        return (mean.float() - self.shift) * self.scale
