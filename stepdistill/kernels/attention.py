"""Attention backends over ``[B, heads, N, d]`` tensors: one call, several kernels, one reference.

``attention(q, k, v, mask=None, backend="auto")`` computes ``softmax(q k^T / sqrt(d) + bias) v`` with

- ``"reference"``: plain torch in float32 (the definition every other backend is tested against);
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (the default everywhere);
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (an optional extra,
  ``pip install -e ".[xformers]"``; CUDA tensors only);
- ``"auto"``: ``select_backend(q.device)``: xformers on CUDA when it imports, else sdpa.

Shapes: q [B, H, N, d], k [B, H, M, d], v [B, H, M, d_v] -> [B, H, N, d_v] in q's dtype.
``mask`` broadcasts to [B, H, N, M]: boolean (True = attend, as SDPA) or an additive float bias
(0 = attend, large negative = masked, as diffusers' ``prepare_attention_mask``).

``set_model_attention(model, "sdpa" | "xformers", device)`` switches the attention layers of whole
diffusers backbones (``trainer.attention``): diffusers' own processors for each backend
(``AttnProcessor2_0`` / ``XFormersAttnProcessor``, their joint-attention twins for SD3-style
transformers) or, for processors written against diffusers' attention dispatcher (Flux, Wan),
their per-processor backend (``native`` / ``xformers``).
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as ap
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import AttentionBackendName
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from stepdistill.errors import StepdistillError

BACKENDS = ("auto", "sdpa", "xformers", "reference")
XFORMERS_FIX = 'pip install -e ".[xformers]" on a CUDA machine'
#: the backends a whole model's attention layers can be switched to (``set_model_attention``)
MODEL_BACKENDS = ("sdpa", "xformers")


# --------------------------------------------------------------------------- the definition
def reference_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` in float32, returned in q's dtype. [B, H, N, d_v]."""
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + additive_bias(mask, torch.float32)
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def additive_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = attend) as an additive bias (0 or -inf); a float mask as is."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


# --------------------------------------------------------------------------- kernels
def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """PyTorch's fused ``scaled_dot_product_attention`` (what diffusers' ``AttnProcessor2_0`` runs)."""
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """xformers' memory-efficient attention (CUDA only); transposes to its [B, N, H, d] layout."""
    ops = require_xformers(q.device)
    bias = None
    if mask is not None:
        shape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        bias = aligned_bias(additive_bias(mask, q.dtype).expand(shape))
    out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def aligned_bias(bias: Tensor) -> Tensor:
    """``bias`` [B, H, N, M] in memory whose last dimension is padded to a multiple of 8, as
    xformers' kernels require of a tensor ``attn_bias`` (the values are a view of the first M)."""
    m = bias.shape[-1]
    padded = torch.empty((*bias.shape[:-1], -(-m // 8) * 8), dtype=bias.dtype, device=bias.device)
    padded[..., :m] = bias
    return padded[..., :m]


# --------------------------------------------------------------------------- selection
@lru_cache(maxsize=1)
def xformers_ops() -> ModuleType | None:
    """``xformers.ops`` when the optional dependency imports, else None (never raises)."""
    try:
        import xformers.ops as ops
    except Exception:  # ImportError, or a build that does not match this torch
        return None
    return ops


def xformers_available() -> bool:
    return xformers_ops() is not None


def require_xformers(device: torch.device) -> ModuleType:
    """``xformers.ops`` for tensors on ``device``, or a one-line ValueError naming the fix."""
    check_backend("xformers")
    ops = xformers_ops()
    if torch.device(device).type != "cuda":
        raise ValueError(f"attention backend 'xformers' needs CUDA tensors (got {device}); use backend='sdpa'")
    return ops


def select_backend(device: torch.device | str) -> str:
    """The backend "auto" means on ``device``: "xformers" on CUDA when it imports, else "sdpa"."""
    return "xformers" if torch.device(device).type == "cuda" and xformers_available() else "sdpa"


KERNELS = {"sdpa": sdpa_attention, "xformers": xformers_attention, "reference": reference_attention}


def check_backend(backend: str) -> str:
    """``backend`` if it names a backend this install can run, else a one-line ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise ValueError(f"attention backend 'xformers' is not installed: {XFORMERS_FIX}, or use backend='sdpa'")
    return backend


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """A concrete backend name for ``backend`` on ``device`` (validates the name)."""
    check_backend(backend)
    return select_backend(device) if backend == "auto" else backend


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``softmax(q k^T / sqrt(d) + mask) v`` [B, H, N, d_v] with the chosen backend (module docstring)."""
    return KERNELS[resolve_backend(backend, q.device)](q, k, v, mask)


# --------------------------------------------------------------------------- a model's attention layers
def check_model_backend(backend: str, device: torch.device | str, key: str = "trainer.attention") -> str:
    """``backend`` if a model on ``device`` can run it, else a one-line ``StepdistillError`` naming the fix
    (``key`` is the setting the user gave: xformers needs the package and a CUDA device)."""
    if backend not in MODEL_BACKENDS:
        raise StepdistillError(f"{key}={backend!r}; allowed: {', '.join(MODEL_BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise StepdistillError(f"{key}=xformers needs the xformers package on a CUDA machine: pip install xformers "
                               f"(or pip install -e \".[xformers]\"), or set {key}=sdpa")
    if backend == "xformers" and torch.device(device).type != "cuda":
        raise StepdistillError(f"{key}=xformers needs a CUDA device (this run is on {torch.device(device)}); "
                               f"set {key}=sdpa")
    return backend


def runnable_model_backend(backend: str, device: torch.device | str) -> str:
    """``backend`` where a model on ``device`` can run it, else "sdpa" (sampling a run trained with
    xformers on a machine without it: the same maths, another kernel)."""
    try:
        return check_model_backend(backend, device)
    except StepdistillError:
        return "sdpa"


def set_run_attention(model: nn.Module, trainer_config: Any, device: torch.device | str) -> dict[str, str]:
    """The attention backend a run trained with (``trainer_config["attention"]``, a mapping or None:
    sdpa) on ``model``, where ``device`` can run it, else sdpa (``set_model_attention``)."""
    backend = str((trainer_config or {}).get("attention", "sdpa"))
    return set_model_attention(model, runnable_model_backend(backend, device), device)


def _processor_classes(backend: str) -> dict[type, type]:
    """diffusers' processor class -> its twin for ``backend`` (self-attention / cross-attention,
    joint attention (SD3), added key / value projections (UnCLIP-style))."""
    families = [((ap.AttnProcessor, ap.AttnProcessor2_0, ap.XFormersAttnProcessor),
                 ap.AttnProcessor2_0, ap.XFormersAttnProcessor),
                ((ap.JointAttnProcessor2_0, ap.XFormersJointAttnProcessor),
                 ap.JointAttnProcessor2_0, ap.XFormersJointAttnProcessor),
                ((ap.AttnAddedKVProcessor, ap.AttnAddedKVProcessor2_0, ap.XFormersAttnAddedKVProcessor),
                 ap.AttnAddedKVProcessor2_0, ap.XFormersAttnAddedKVProcessor)]
    return {cls: (sdpa if backend == "sdpa" else xformers) for members, sdpa, xformers in families
            for cls in members}


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """diffusers' attention layers of ``model`` (``Attention`` and the newer ``AttentionModuleMixin``), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))}


def set_model_attention(model: nn.Module, backend: str, device: torch.device | str,
                        key: str = "trainer.attention") -> dict[str, str]:
    """Switch every diffusers attention layer of ``model`` to ``backend`` (sdpa | xformers).

    Layers with one of diffusers' standard processors get that processor's ``backend`` twin
    (``_processor_classes``); layers whose processor goes through diffusers' dispatcher
    (``processor._attention_backend``) get the dispatcher's backend (``native`` is SDPA); any other
    processor (custom ones: IP adapters, negative-prompt steering while it is installed) is kept.
    A model without attention (the toy MLP, the digits UNet) is left as it is.

    Returns:
        layer name -> the processor it runs now (class name; ``Class[backend]`` for dispatched ones),
        for the layers that were switched.
    Raises:
        StepdistillError: ``backend`` cannot run on ``device`` (``check_model_backend``).
    """
    check_model_backend(backend, device, key)
    twins = _processor_classes(backend)
    switched: dict[str, str] = {}
    for name, layer in attention_layers(model).items():
        processor = layer.processor
        if type(processor) in twins:
            if type(processor) is not twins[type(processor)]:
                layer.set_processor(twins[type(processor)]())
            switched[name] = type(layer.processor).__name__
        elif hasattr(processor, "_attention_backend"):
            processor._attention_backend = AttentionBackendName("native" if backend == "sdpa" else "xformers")
            switched[name] = f"{type(processor).__name__}[{processor._attention_backend.value}]"
    return switched
