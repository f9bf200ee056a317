"""Images for FID: where they come from (a directory, a tensor, a run's student) and the one resize
protocol the Inception features see.

Every source yields batches of uint8 ``[H, W, C]`` arrays (RGB from files; a tensor's own channels,
which the feature extractors convert): images are quantized to uint8 first, as when saved as PNG,
so a directory of PNGs and the tensor they were saved from give the same features.

Protocol ``clean-bicubic-299`` (Inception features; clean-fid's "clean" mode, Parmar et al. 2022):

1. uint8 RGB (grey and palette images converted by PIL, alpha dropped);
2. each channel resized to 299 x 299 by PIL's bicubic filter in float mode (``'F'``), which
   antialiases when downscaling; sizes already 299 x 299 are left untouched;
3. clipped to [0, 255], *not* quantized again;
4. ``(x - 128) / 128``: the range (-1, 0.9921875) the TensorFlow 2015-12-05 network was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor

from stepdistill.errors import StepdistillError
from stepdistill.pipelines.conditions import student_conditioning, teacher_dir
from stepdistill.pipelines.few_step import decode_latents, generate, pixels_to_unit
from stepdistill.pipelines.runs import load_run

PROTOCOL = "clean-bicubic-299"
INCEPTION_SIZE = 299
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------- the protocol
def resize_channels(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """Step 2-3 of the protocol: ``[H, W, C]`` uint8 -> float32 ``[C, size, size]`` in [0, 255],
    each channel resized by PIL bicubic in float mode, no re-quantization."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    channels = [
        # a float32 array is PIL mode 'F' (32-bit float): no quantization inside the filter
        np.asarray(Image.fromarray(image[..., c].astype(np.float32)).resize((size, size), Image.BICUBIC))
        for c in range(image.shape[2])
    ]
    return np.clip(np.stack(channels), 0.0, 255.0)


def inception_input(images: Sequence[np.ndarray], size: int = INCEPTION_SIZE) -> Tensor:
    """The network's input for uint8 RGB images of any sizes: float32 ``[N, 3, size, size]`` in
    (-1, 0.9921875) (steps 2-4 of the protocol)."""
    batch = np.stack([resize_channels(rgb(image), size) for image in images])
    return (torch.from_numpy(batch) - 128.0) / 128.0


def rgb(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, 1|3|4]`` uint8 -> ``[H, W, 3]`` (grey repeated, alpha dropped)."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[..., :3]


def grey(image: np.ndarray) -> np.ndarray:
    """``[H, W, C]`` uint8 -> ``[H, W]`` by PIL's ``convert("L")`` (ITU-R 601 luma; grey is kept)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return image.reshape(image.shape[:2])
    return np.asarray(Image.fromarray(rgb(image)).convert("L"))


def quantize(images: Tensor) -> np.ndarray:
    """Images ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]``, clamped and rounded as when
    saved as PNG (``stepdistill.data.digits.to_uint8``)."""
    return quantize_unit((images.detach().float().cpu() + 1.0) / 2.0)


def quantize_unit(images: Tensor) -> np.ndarray:
    """Images ``[N, C, H, W]`` in [0, 1] -> uint8 ``[N, H, W, C]`` (clamped, ``round(255 x)``), as
    ``stepdistill sample`` saves them."""
    unit = images.detach().float().cpu().clamp(0.0, 1.0)
    return (unit * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --------------------------------------------------------------------------- sources
def list_images(directory: str | Path) -> list[Path]:
    """Image files under ``directory`` (recursive; png, jpg, jpeg, webp, bmp), sorted.

    Raises:
        StepdistillError: not a directory, or no images in it.
    """
    root = Path(directory)
    if not root.is_dir():
        raise StepdistillError(f"image directory not found: {str(root)!r}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise StepdistillError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {str(root)!r}")
    return files


def load_image(path: Path) -> np.ndarray:
    """One file as uint8 ``[H, W, 3]`` RGB; a file that does not decode is a one-line error."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise StepdistillError(f"cannot read image {str(path)!r}: {reason}") from None


def file_batches(files: Sequence[Path], batch_size: int) -> Iterator[list[np.ndarray]]:
    """The files' images, ``batch_size`` at a time, loaded lazily."""
    for start in range(0, len(files), batch_size):
        yield [load_image(p) for p in files[start:start + batch_size]]


def tensor_batches(images: Tensor, batch_size: int) -> Iterator[list[np.ndarray]]:
    """Images ``[N, C, H, W]`` in [-1, 1], quantized to uint8, ``batch_size`` at a time."""
    if images.dim() != 4:
        raise StepdistillError(f"image tensors must be [N, C, H, W] in [-1, 1]; got shape {tuple(images.shape)}")
    for chunk in images.split(batch_size):
        yield list(quantize(chunk))


def is_run_dir(path: str | Path) -> bool:
    """A training run directory (it holds ``student/``), not a directory of images."""
    return (Path(path) / "student").is_dir()


def run_batches(run_dir: str | Path, num: int, batch_size: int, seed: int = 0,
                device: str = "cpu") -> Iterator[list[np.ndarray]]:
    """``num`` samples of a run's student, decoded and quantized like ``stepdistill sample run=...
    num_images=num seed=seed batch_size=batch_size`` writes them (the same images), in batches.

    Conditions as ``stepdistill sample``: class students cycle the classes; text students use the
    prompts their run config lists.
    """
    student = load_run(run_dir)
    generator = student.generator.to(device)
    cond, meta = student_conditioning(student, {}, num)
    vae = None
    if "prompts" in meta:
        vae = AutoencoderKL.from_pretrained(str(teacher_dir(student) / "vae")).to(device)
    if len(generator.denoiser.sample_shape) != 3:
        raise StepdistillError(f"run {str(run_dir)!r} samples points, not images: FID needs an image student")
    rng = torch.Generator().manual_seed(int(seed))
    for start in range(0, num, batch_size):
        x0 = generate(generator, cond.index(slice(start, start + batch_size)), None, rng)
        with torch.no_grad():
            unit = decode_latents(vae, x0) if vae is not None else pixels_to_unit(x0)
        yield list(quantize_unit(unit))
