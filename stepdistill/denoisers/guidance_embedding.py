"""The guidance embedding of LCM students: the CFG scale as an input of the network.

LCM (Luo et al. 2023, Sec. 4.2) feeds w to the student through a sinusoidal embedding added to the
timestep embedding, so one forward reproduces the teacher's CFG at any w in the trained range.
diffusers' ``UNet2DConditionModel`` has the hook for it: ``time_cond_proj_dim`` adds a bias-free
``time_embedding.cond_proj`` whose output is added to the timestep features, and the SD / SDXL
pipelines fill ``timestep_cond`` from ``guidance_scale`` by themselves (``w = guidance_scale - 1``).

Every other backbone here (``UNet2DModel``, ``ToyMLP``) has the same ``TimestepEmbedding`` module,
whose ``forward(sample, condition)`` already applies ``cond_proj``: we add the projection there too
and pass the condition through a forward pre-hook, so one code path serves all backbones. The
projection starts at zero, so a fresh student equals its teacher at every w.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

CONFIG_KEY = "time_cond_proj_dim"


def guidance_scale_embedding(scale: Tensor, dim: int) -> Tensor:
    """Sinusoidal features [B, dim] of ``w = scale - 1`` times 1000 (VDM's embedding, as LCM and
    diffusers' ``get_guidance_scale_embedding``), in float32.

    Args:
        scale: [B] CFG scales s in the ``u + s (c - u)`` convention (s = w + 1).
    """
    w = (scale.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def time_embedding(backbone: nn.Module) -> nn.Module:
    """The backbone's diffusers ``TimestepEmbedding`` (``backbone.time_embedding``)."""
    module = getattr(backbone, "time_embedding", None)
    if module is None or not hasattr(module, "linear_1"):
        raise ValueError(f"{type(backbone).__name__} has no diffusers TimestepEmbedding at .time_embedding: "
                         "it cannot take a guidance embedding")
    return module


def embedding_dim(backbone: nn.Module) -> int | None:
    """The guidance embedding size of ``backbone`` (None when it has none)."""
    proj = getattr(getattr(backbone, "time_embedding", None), "cond_proj", None)
    return None if proj is None else int(proj.in_features)


def add_guidance_embedding(backbone: nn.Module, dim: int) -> None:
    """Give ``backbone`` a zero-initialised guidance projection of size ``dim`` (in place), recorded
    as ``time_cond_proj_dim`` in its config (diffusers reads it back for ``UNet2DConditionModel``;
    ``load_denoiser`` restores it for the others)."""
    if dim < 2:
        raise ValueError(f"the guidance embedding size must be >= 2, got {dim}")
    module = time_embedding(backbone)
    if getattr(module, "cond_proj", None) is not None:
        raise ValueError(f"{type(backbone).__name__} already has a guidance embedding")
    ref = module.linear_1.weight
    module.cond_proj = nn.Linear(dim, module.linear_1.in_features, bias=False).to(ref.device, ref.dtype)
    nn.init.zeros_(module.cond_proj.weight)
    backbone.register_to_config(**{CONFIG_KEY: int(dim)})


@contextlib.contextmanager
def guidance_condition(backbone: nn.Module, scale: Tensor) -> Iterator[None]:
    """Within the block, ``backbone``'s timestep embedding receives the guidance features of
    ``scale`` [B] (a forward pre-hook that sets ``TimestepEmbedding.forward``'s ``condition``)."""
    module = time_embedding(backbone)
    dim = embedding_dim(backbone)

    def hook(_module, args, kwargs):
        emb = guidance_scale_embedding(scale.to(args[0].device), dim).to(args[0].dtype)
        kwargs.pop("condition", None)
        return (args[0], emb), kwargs

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
