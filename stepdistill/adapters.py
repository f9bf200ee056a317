"""Guidance adapters (AGD, Jensen et al. 2025): one forward pass that reproduces CFG at any scale.

Small modules run after chosen blocks of a *frozen* backbone and add their output to the block's
output (Sec. 3.2 of the paper). Every adapter reads a context built from embeddings of the CFG scale
w, the timestep and the condition:

- ``cross_attention``: queries from the block's hidden states, keys and values from the context
  tokens ``[emb(w), emb(t), emb(cond)...]`` (the paper's cross-attention adapter);
- ``offset``: an MLP of ``emb(w) + emb(t) + emb(cond)`` broadcast-added to the hidden states.

Each adapter's output projection starts at zero, so a fresh set of adapters is exactly the base
model. The adapters act only inside ``GuidanceAdapters.active(t, cond)``: any other call of the
backbone (the teacher, which shares the network) runs the base model. They attach through forward
hooks, so the backbone's own modules, names and ``save_pretrained`` files are unchanged, and the
same adapters load onto any checkpoint of the same base (a DMD2 or LCM student of it included).

Targets: diffusers ``Attention`` modules (the cross-attentions ``attn2`` when the model has them),
else the residual blocks (``ResnetBlock2D``, ``ToyBlock``) of attention-free backbones.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.utils import BaseOutput
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.base import Denoiser
from stepdistill.denoisers.guidance_embedding import guidance_scale_embedding
from stepdistill.errors import StepdistillError

KINDS = ("cross_attention", "offset")
WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
_BLOCK_TYPES = ("ResnetBlock2D", "ToyBlock")


# ----------------------------------------------------------------------------- targets
def default_targets(backbone: nn.Module) -> list[str]:
    """Cross-attentions (``...attn2``) if any, else every diffusers ``Attention``, else every
    residual block of an attention-free backbone (the digits UNet, the toy MLP)."""
    named = list(backbone.named_modules())
    attention = [n for n, m in named if type(m).__name__ == "Attention"]
    cross = [n for n in attention if n.endswith("attn2")]
    blocks = [n for n, m in named if type(m).__name__ in _BLOCK_TYPES]
    found = cross or attention or blocks
    if not found:
        raise ValueError(f"{type(backbone).__name__} has no attention or residual blocks to adapt: "
                         "set generator.target_modules to a list of module names or a regex")
    return found


def resolve_targets(backbone: nn.Module, targets: list[str] | str | None) -> list[str]:
    """Module names from a list (exact names), a regex (full match), or None (``default_targets``)."""
    if targets is None:
        return default_targets(backbone)
    names = [n for n, _ in backbone.named_modules() if n]
    if isinstance(targets, str):
        found = [n for n in names if re.fullmatch(targets, n)]
    else:
        missing = [t for t in targets if t not in names]
        if missing:
            raise ValueError(f"generator.target_modules {missing} are not modules of {type(backbone).__name__}; "
                             f"e.g. {names[:6]}")
        found = list(targets)
    if not found:
        raise ValueError(f"generator.target_modules {targets!r} match no module of {type(backbone).__name__}")
    return found


def output_channels(module: nn.Module) -> int:
    """Channels of a block's output: those of its last linear or convolution layer."""
    last = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    if not last:
        raise ValueError(f"cannot tell the output channels of {type(module).__name__}")
    layer = last[-1]
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)


def condition_spec(backbone: nn.Module) -> dict[str, int | str]:
    """What the context encoder embeds: class labels (table size), prompt tokens (width), or nothing."""
    config = getattr(backbone, "config", {})
    if config.get("num_class_embeds"):
        return {"kind": "class", "size": int(config["num_class_embeds"])}
    if config.get("num_classes"):  # ToyMLP: the classes plus the null class
        return {"kind": "class", "size": int(config["num_classes"]) + 1}
    width = config.get("cross_attention_dim") or config.get("joint_attention_dim")
    if width:
        return {"kind": "text", "size": int(width if isinstance(width, int) else width[0])}
    return {"kind": "none", "size": 0}


# ----------------------------------------------------------------------------- modules
class _Context:
    """The current forward's context (a plain object shared by reference, so deep copies of the
    adapters share their own copy of it)."""

    def __init__(self) -> None:
        self.tokens: Tensor | None = None
        self.vector: Tensor | None = None


class ContextEncoder(nn.Module):
    """Context tokens [B, 2 + n, dim]: emb(w), emb(t) and the condition's n tokens (1 for a class,
    the prompt's tokens for text, none when unconditional)."""

    def __init__(self, dim: int, condition: dict[str, Any], freq_dim: int = 64) -> None:
        super().__init__()
        self.freq_dim = int(freq_dim)
        self.scale_embedding = TimestepEmbedding(self.freq_dim, dim)
        self.time_proj = Timesteps(self.freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(self.freq_dim, dim)
        kind, size = condition["kind"], int(condition["size"])
        self.class_embedding = nn.Embedding(size, dim) if kind == "class" else None
        self.text_proj = nn.Linear(size, dim) if kind == "text" else None

    def forward(self, scale: Tensor, model_time: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.scale_embedding.linear_1.weight.dtype
        w = self.scale_embedding(guidance_scale_embedding(scale, self.freq_dim).to(dtype))
        t = self.time_embedding(self.time_proj(model_time).to(dtype))
        tokens = [w[:, None], t[:, None]]
        if self.class_embedding is not None:
            tokens.append(self.class_embedding(cond.class_labels.long())[:, None])
        elif self.text_proj is not None:
            tokens.append(self.text_proj(cond.prompt_embeds.to(dtype)))
        return torch.cat(tokens, dim=1)


class OffsetAdapter(nn.Module):
    """``h + W silu(emb(w) + emb(t) + mean emb(cond))``, broadcast over positions; W starts at 0."""

    def __init__(self, channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor, context: _Context) -> Tensor:
        offset = self.proj(F.silu(context.vector)).to(hidden.dtype)
        if hidden.dim() == 4:  # [B, C, H, W]
            return hidden + offset[:, :, None, None]
        if hidden.dim() == 3:  # [B, N, C]
            return hidden + offset[:, None, :]
        return hidden + offset


class CrossAttentionAdapter(nn.Module):
    """``h + W_o softmax(q(norm h) k(ctx)^T / sqrt(d)) v(ctx)``: queries from the hidden states, keys
    and values from the context tokens; W_o starts at 0."""

    def __init__(self, channels: int, dim: int, attn_dim: int = 16, heads: int = 1) -> None:
        super().__init__()
        if attn_dim % heads:
            raise ValueError(f"generator.attn_dim={attn_dim} must be divisible by generator.heads={heads}")
        self.heads = int(heads)
        self.to_q = nn.Linear(channels, attn_dim, bias=False)
        self.to_k = nn.Linear(dim, attn_dim, bias=False)
        self.to_v = nn.Linear(dim, attn_dim, bias=False)
        self.to_out = nn.Linear(attn_dim, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: Tensor, context: _Context) -> Tensor:
        tokens, restore = _as_tokens(hidden)
        b, n, _ = tokens.shape
        q = self.to_q(F.layer_norm(tokens, tokens.shape[-1:]).to(self.to_q.weight.dtype))
        k, v = self.to_k(context.tokens), self.to_v(context.tokens)
        split = lambda x: x.reshape(b, x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        # a handful of context tokens: a plain softmax beats a fused kernel's setup cost
        weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        delta = self.to_out((weights @ v).transpose(1, 2).reshape(b, n, -1)).to(hidden.dtype)
        return hidden + restore(delta)


def _as_tokens(hidden: Tensor):
    """Hidden states as tokens [B, N, C] and the function that puts a [B, N, C] result back."""
    if hidden.dim() == 4:
        b, c, h, w = hidden.shape
        return hidden.flatten(2).transpose(1, 2), lambda x: x.transpose(1, 2).reshape(b, c, h, w)
    if hidden.dim() == 3:
        return hidden, lambda x: x
    return hidden[:, None], lambda x: x[:, 0]


class _Hook:
    """The forward hook of one adapted block: adds the adapter's output when a context is active."""

    def __init__(self, adapter: nn.Module, context: _Context) -> None:
        self.adapter, self.context = adapter, context

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if self.context.tokens is None:
            return output
        if isinstance(output, Tensor):
            return self.adapter(output, self.context)
        if isinstance(output, BaseOutput) and isinstance(output.get("sample"), Tensor):
            output["sample"] = self.adapter(output["sample"], self.context)
            return output
        if isinstance(output, tuple) and isinstance(output[0], Tensor):
            return (self.adapter(output[0], self.context), *output[1:])
        raise TypeError(f"cannot adapt a block whose output is {type(output).__name__}")


class GuidanceAdapters(nn.Module):
    """AGD adapters attached to ``denoiser``'s backbone (frozen; it is not a submodule of this).

    Args:
        denoiser: the base network (teacher, or any checkpoint of the same base).
        kind: ``cross_attention`` or ``offset``.
        dim: width of the context embeddings.
        attn_dim: query / key / value width of a cross-attention adapter.
        heads: attention heads of a cross-attention adapter.
        target_modules: block names, a regex, or None (``default_targets``).
    """

    def __init__(self, denoiser: Denoiser, kind: str = "cross_attention", dim: int = 64, attn_dim: int = 16,
                 heads: int = 1, target_modules: list[str] | str | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"generator.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        backbone = denoiser.backbone
        self.settings = {"kind": kind, "dim": int(dim), "attn_dim": int(attn_dim), "heads": int(heads),
                         "targets": resolve_targets(backbone, target_modules),
                         "condition": condition_spec(backbone)}
        self.context_encoder = ContextEncoder(int(dim), self.settings["condition"])
        modules = dict(backbone.named_modules())
        self.blocks = nn.ModuleDict({_key(n): self._adapter(output_channels(modules[n]))
                                     for n in self.settings["targets"]})
        self._context = _Context()
        self.enabled = True
        self._schedule = denoiser.schedule
        self.attach(backbone)
        ref = next(backbone.parameters())
        self.to(ref.device)

    def _adapter(self, channels: int) -> nn.Module:
        s = self.settings
        if s["kind"] == "offset":
            return OffsetAdapter(channels, s["dim"])
        return CrossAttentionAdapter(channels, s["dim"], s["attn_dim"], s["heads"])

    def attach(self, backbone: nn.Module) -> None:
        """Hook the adapters onto ``backbone``'s target blocks (detaching them from any earlier one)."""
        self.detach()
        modules = dict(backbone.named_modules())
        missing = [n for n in self.settings["targets"] if n not in modules]
        if missing:
            raise ValueError(f"these adapters were trained for blocks {missing} that "
                             f"{type(backbone).__name__} does not have (another base model?)")
        self._handles = [modules[n].register_forward_hook(_Hook(self.blocks[_key(n)], self._context))
                         for n in self.settings["targets"]]

    def detach(self) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def active(self, t: Tensor, cond: Conditioning) -> Iterator[None]:
        """Within the block, the adapted backbone reproduces CFG at ``cond.guidance`` [B]."""
        if not self.enabled:
            yield
            return
        if cond.guidance is None:
            raise ValueError("the adapters need the CFG scale: pass cond.with_guidance(scale)")
        model_time = self._schedule.to_model_time(t).to(device=cond.guidance.device, dtype=torch.float32)
        tokens = self.context_encoder(cond.guidance, model_time, cond)
        condition = tokens[:, 2:].mean(1) if tokens.shape[1] > 2 else 0.0
        self._context.tokens, self._context.vector = tokens, tokens[:, 0] + tokens[:, 1] + condition
        try:
            yield
        finally:
            self._context.tokens = self._context.vector = None

    @contextlib.contextmanager
    def guiding(self, denoiser: Denoiser, scale: float) -> Iterator[None]:
        """Within the block every call of ``denoiser`` (which these adapters are attached to: e.g. a
        DMD2 or LCM student of the same base, through its own sampler) runs with the adapters active
        at CFG scale ``scale``, unless its condition carries its own scale."""

        def before(_module, args, kwargs):
            given = {**dict(zip(("x_t", "t", "cond"), args, strict=False)), **kwargs}  # Denoiser.forward(x_t, t, cond)
            x_t, t, cond = given["x_t"], given["t"], given["cond"]
            t = torch.as_tensor(t, device=x_t.device, dtype=torch.float64).expand(x_t.shape[0])
            cond = cond if cond.guidance is not None else cond.with_guidance(scale)
            stack.enter_context(self.active(t, cond.to(x_t.device)))

        def after(_module, _args, _kwargs, output):
            stack.close()
            return output

        stack = contextlib.ExitStack()
        handles = [denoiser.register_forward_pre_hook(before, with_kwargs=True),
                   denoiser.register_forward_hook(after, with_kwargs=True)]
        try:
            yield
        finally:
            stack.close()
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within the block the adapters are off: the network is the base model again."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    # ------------------------------------------------------------------------- files
    def save(self, directory: str | Path) -> Path:
        """``adapters.safetensors`` + ``adapter_config.json`` in ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(out / WEIGHTS))
        (out / CONFIG).write_text(json.dumps(self.settings, indent=2))
        return out

    @classmethod
    def load(cls, directory: str | Path, denoiser: Denoiser) -> GuidanceAdapters:
        """Adapters saved by ``save`` (or ``stepdistill export format=adapters``), attached to
        ``denoiser`` (the base they were trained on, or another checkpoint of it)."""
        root = Path(directory)
        if not (root / CONFIG).is_file() or not (root / WEIGHTS).is_file():
            raise StepdistillError(f"{str(root)!r} holds no adapters ({CONFIG} and {WEIGHTS}): pass the directory "
                                   "`stepdistill export format=adapters` wrote, or a run's student/adapters")
        s = json.loads((root / CONFIG).read_text())
        if condition_spec(denoiser.backbone) != s["condition"]:
            raise StepdistillError(f"the adapters in {str(root)!r} were trained for condition {s['condition']}, "
                                   f"this model takes {condition_spec(denoiser.backbone)}: use the same base model")
        adapters = cls(denoiser, s["kind"], s["dim"], s["attn_dim"], s["heads"], s["targets"])
        try:
            adapters.load_state_dict(load_file(str(root / WEIGHTS)))
        except Exception as e:  # noqa: BLE001 - safetensors and torch raise several types for a bad file
            adapters.detach()
            raise StepdistillError(f"could not load {str(root / WEIGHTS)!r} (corrupt, or another base?): "
                                   f"{str(e).splitlines()[0]}") from None
        return adapters.requires_grad_(False)


def _key(name: str) -> str:
    return name.replace(".", "__")


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
