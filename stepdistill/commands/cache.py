"""``stepdistill cache (experiment=E | data=prompts|image_captions data.*=...) teacher.path=DIR out=DIR``:
encode every training prompt once with the teacher's text encoders (and every training image to
latents with its VAE), so training (``data.cache=DIR``) never loads them.

Composes ``configs/train.yaml`` as ``stepdistill train`` does (an experiment, or a ``data=`` group with
its keys and ``teacher.path``); the rows are the data's (``data.file`` / ``data.prompts``, or
``data.folder``'s captioned images), the encoders those of ``task.text_encoder`` (the teacher's), the
null condition ``task.negative_prompt``. Its own keys:

- ``out=DIR`` (required): the cache directory (``stepdistill.data.text_cache`` describes its files).
- ``batch_size=64``: rows encoded at once.
- ``shard_size=0``: rows per shard file; 0 chooses about 256 MiB per shard.
- ``dtype=fp32|bf16|fp16``: the stored dtype (the encoders run in fp32 either way; fp32 gives
  training the very embeddings it would compute itself, bf16 half the disk).
- ``device=auto|cpu|cuda|cuda:N``: where the encoders run (auto: the GPU when there is one).
- ``overwrite=true``: replace a cache of other prompts or encoders in ``out``.
- ``progress=false``: no progress bar.

Re-running the same command resumes: whole shards are kept, missing or half-written ones are redone,
and nothing is loaded when every shard is there. The cache holds the training rows only: ``stepdistill
sample`` / ``eval-coco`` / ``eval-clip`` load the encoders themselves after training.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from stepdistill.args import parse_args
from stepdistill.config import compose, compose_train, instantiate
from stepdistill.data.images import ImageCaptionData, VaeLatents
from stepdistill.data.prompts import PromptData, PromptEncoder, pixel_size
from stepdistill.data.text_cache import (
    DTYPES,
    CacheKey,
    encoder_fingerprint,
    rows_hash,
    vae_fingerprint,
    write_cache,
)
from stepdistill.denoisers.loading import resolve_local_dir
from stepdistill.errors import StepdistillError

KEYS = {"out": "str", "batch_size": "int", "shard_size": "int", "dtype": "str", "device": "str",
        "overwrite": "bool", "progress": "bool"}


def run(overrides: Sequence[str]) -> dict:
    """Write (or finish) the cache; returns ``write_cache``'s summary plus ``out``."""
    own = [o for o in overrides if o.split("=", 1)[0] in KEYS]
    args = parse_args(own, KEYS, "cache")
    cfg = compose_cache([o for o in overrides if o not in own])
    out, dtype = args.get("out"), str(args.get("dtype", "fp32"))
    if not out:
        raise StepdistillError("out is required: the cache directory (out=DIR), later data.cache=DIR")
    if dtype not in DTYPES:
        raise StepdistillError(f"dtype={dtype!r}; allowed: {', '.join(DTYPES)}")
    if int(args.get("batch_size", 64)) < 1 or int(args.get("shard_size", 0)) < 0:
        raise StepdistillError("batch_size must be >= 1 and shard_size >= 0 (0: automatic)")
    data, teacher, negative = build_rows(cfg)
    images = isinstance(data, ImageCaptionData)
    key = CacheKey(teacher=str(teacher.resolve()), encoder_hash=encoder_fingerprint(teacher),
                   rows_hash=rows_hash(data.cache_rows()), num_rows=len(data), negative_prompt=negative,
                   dtype=dtype, vae_hash=vae_fingerprint(teacher) if images else None)
    encoders = Encoders(teacher, _device(str(args.get("device", "auto"))), data, negative)
    summary = write_cache(out, key, data.prompts, encoders.rows, encoders.null,
                          batch_size=int(args.get("batch_size", 64)), shard_size=int(args.get("shard_size", 0)),
                          overwrite=bool(args.get("overwrite", False)), progress=bool(args.get("progress", True)))
    print(f"cached {summary['rows']} rows in {summary['shards']} shards ({summary['written']} written now, "
          f"{summary['bytes'] / 2**20:.1f} MiB) in {out}: train with data.cache={out}")
    return {**summary, "out": str(out)}


def compose_cache(overrides: Sequence[str]) -> DictConfig:
    """``train.yaml`` with an experiment, or with ``data=<group>`` (composed as ``+data=<group>``)."""
    overrides = [f"+{o}" if o.startswith("data=") else o for o in overrides]
    if any(o.startswith("experiment=") for o in overrides):
        cfg = compose_train(overrides)
    else:
        cfg = compose("train", overrides)
    if cfg.get("data") is None or cfg.get("task") is None:
        raise StepdistillError("choose the data to cache: experiment=<dataset>/<name>, or data=prompts "
                               "data.file=FILE (data=image_captions data.folder=DIR) teacher.path=DIR")
    return cfg


def build_rows(cfg: DictConfig) -> tuple[PromptData | ImageCaptionData, Path, str]:
    """The data (its own ``cache`` key ignored), the encoders' directory and the negative prompt."""
    node = cfg.data.copy()
    if "cache" in node:
        node.cache = None
    data = instantiate(node)
    if not isinstance(data, PromptData | ImageCaptionData):
        raise StepdistillError(f"`stepdistill cache` encodes prompts: {type(data).__name__} has none "
                               "(use data=prompts or data=image_captions)")
    source = cfg.task.get("text_encoder") or cfg.teacher.path
    if source is None:
        raise StepdistillError("teacher.path is required: a local diffusers directory (teacher.path=DIR)")
    teacher = resolve_local_dir(source, "teacher")
    expected = pixel_size(teacher)
    if isinstance(data, ImageCaptionData) and expected is not None and data.resolution != expected:
        raise StepdistillError(f"data.resolution={data.resolution} but the teacher in {str(teacher)!r} works on "
                               f"{expected}-pixel images: set data.resolution={expected}")
    return data, teacher, str(cfg.task.get("negative_prompt", "") or "")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StepdistillError(f"device={name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StepdistillError(f"device={name!r} but torch sees no CUDA GPU here: use device=cpu (or auto)")
    return device


class Encoders:
    """The teacher's text encoders (and VAE, for images), loaded on first use: a resumed cache whose
    shards are all there loads nothing.

    Args:
        teacher: the pipeline directory.
        device: where they run (in fp32, as the training task runs them).
        data: the rows.
        negative: the null condition's prompt.
    """

    def __init__(self, teacher: Path, device: torch.device, data: PromptData | ImageCaptionData,
                 negative: str) -> None:
        self.teacher, self.device, self.data, self.negative = teacher, device, data, negative

    @cached_property
    def text(self) -> PromptEncoder:
        return PromptEncoder.from_pretrained(self.teacher).to(self.device)

    @cached_property
    def vae(self) -> VaeLatents:
        return VaeLatents.from_pretrained(self.teacher).to(self.device)

    def rows(self, start: int, stop: int) -> dict[str, Tensor]:
        """Rows [start, stop): prompt_embeds [n, L, D], pooled_embeds [n, P], latents [n, C, h, w]."""
        cond = self.text.encode(self.data.prompts[start:stop], self.negative)
        out = {"prompt_embeds": cond.prompt_embeds}
        if cond.pooled_embeds is not None:
            out["pooled_embeds"] = cond.pooled_embeds
        if isinstance(self.data, ImageCaptionData):
            out["latents"] = self.vae(torch.stack([self.data.image(i) for i in range(start, stop)]))
        return out

    def null(self) -> dict[str, Tensor]:
        """null_prompt_embeds [1, L, D], null_pooled_embeds [1, P], time_ids [1, 6] (those present)."""
        cond = self.text.encode(self.data.prompts[:1], self.negative)
        out = {"null_prompt_embeds": cond.null_prompt_embeds}
        if cond.null_pooled_embeds is not None:
            out["null_pooled_embeds"] = cond.null_pooled_embeds
        if cond.time_ids is not None:
            out["time_ids"] = cond.time_ids[:1]
        return out
