"""Activation memory of a denoiser, measured by running it on the ``meta`` device.

A real-size model built on ``meta`` has shapes and dtypes but no data, so a forward and backward
cost no memory and little time, yet allocate exactly the tensors a real run allocates. ``LiveBytes``
(a ``TorchDispatchMode``) adds the bytes of every new storage an operator returns and subtracts them
when the storage is freed (a weak-reference callback), so its peak is the peak of live activation
memory, with autograd's saved tensors, views and in-place results handled as torch handles them:

- ``train_peak``: forward with grad + backward of ``mean(output)``; parameter gradients are dropped as
  soon as they are accumulated (they are counted by the planner's static terms, not here).
- ``saved``: what is still alive after the forward with grad (autograd's saved tensors).
- ``infer_peak``: a forward under ``no_grad`` (the teacher's, the critic's fake score).

Attention runs through a stand-in for fused (flash) attention: on ``meta`` torch falls back to the
math kernel, which materialises the [B, heads, L, L] score matrix that CPUs and GPUs never allocate.
The stand-in calls the flash kernel's shape function and saves what flash attention saves (q, k, v,
the output and its log-sum-exp [B, heads, L]). Gradient checkpointing is traced as it runs
(diffusers' non-reentrant ``torch.utils.checkpoint``): block inputs during the forward, one block's
activations recomputed at a time in the backward.

Not modelled: workspaces inside an operator (cuDNN / GEMM scratch), the caching allocator's rounding
and fragmentation, autocast's fp32 islands (norms and softmax run in fp32 under bf16 autocast; the
trace runs every op in the compute dtype).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented dispatch-mode base


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created by operators inside the mode, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tensors(out):
            self._track(t)
        return out

    def exclude(self, tensors: Iterator[Tensor] | list[Tensor]) -> None:
        """Storages that exist already (parameters, inputs): views of them cost nothing."""
        for t in tensors:
            self._track(t, counted=False)

    def _track(self, t: Tensor, counted: bool = True) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._refs and self._refs[key]() is storage:
            return
        nbytes = storage.nbytes() if counted else 0
        self._refs[key] = weakref.ref(storage, lambda _r, n=nbytes, k=key: self._free(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live


def tensors(value) -> Iterator[Tensor]:
    """The tensors in an operator's output or a dict of inputs (nested tuples, lists, dicts)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors(v)


class _FlashAttention(torch.autograd.Function):
    """Fused attention's memory: output + log-sum-exp saved with q, k, v (no score matrix)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:  # type: ignore[override]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Within the block ``F.scaled_dot_product_attention`` on ``meta`` allocates as flash attention."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type != "meta" or attn_mask is not None or is_causal or key.shape[-3] != query.shape[-3]:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        return _FlashAttention.apply(query, key, value, scale)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Trace:
    """Activation bytes of one backbone call at one batch size (see the module docstring)."""

    train_peak: int
    saved: int
    infer_peak: int


def trace(backbone: nn.Module, make_inputs: Callable[[], dict[str, Tensor]], *, checkpointing: bool) -> Trace:
    """Run ``backbone(**make_inputs())`` on ``meta`` (its parameters must be there) with and without
    grad; ``checkpointing``: diffusers' ``enable_gradient_checkpointing`` for the graded pass."""
    params = [p for p in backbone.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(_drop_grad) for p in params]
    was_checkpointing = bool(getattr(backbone, "gradient_checkpointing", False))
    _set_checkpointing(backbone, checkpointing)
    try:
        with fused_attention():
            inputs = make_inputs()
            existing = [*backbone.parameters(), *backbone.buffers(), *tensors(inputs)]
            mode = LiveBytes()
            mode.exclude(existing)
            with mode:
                out = _first_tensor(backbone(**inputs))
                saved = mode.live - out.untyped_storage().nbytes()
                out.float().mean().backward()
                del out
            train_peak = mode.peak
            mode = LiveBytes()
            mode.exclude(existing)
            with torch.no_grad(), mode:
                _first_tensor(backbone(**inputs))
            infer_peak = mode.peak
    finally:
        for h in hooks:
            h.remove()
        _set_checkpointing(backbone, was_checkpointing)
    return Trace(train_peak=train_peak, saved=saved, infer_peak=infer_peak)


def _drop_grad(p: Tensor) -> None:
    p.grad = None


def _first_tensor(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)


def _set_checkpointing(backbone: nn.Module, enabled: bool) -> None:
    if enabled and hasattr(backbone, "enable_gradient_checkpointing"):
        backbone.enable_gradient_checkpointing()
    elif not enabled and hasattr(backbone, "disable_gradient_checkpointing"):
        backbone.disable_gradient_checkpointing()
