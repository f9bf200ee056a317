"""Negative-prompt steering of cross-attention for one-step generators (SNOOPI's NASA).

A one-step student has no second forward to spend on classifier-free guidance, so a negative
prompt cannot be subtracted at the output. SNOOPI (Nguyen et al. 2024, "SNOOPI: Supercharged
One-step Diffusion Distillation with Proper Guidance", Negative-Away Steer Attention, NASA) subtracts
it inside every cross-attention layer instead:

    out = to_out( Attn(Q, K+, V+) - alpha * Attn(Q, K-, V-) )

with Q from the hidden states, K+ / V+ from the prompt embeddings the backbone is called with and
K- / V- from the negative prompt embeddings, through the same ``to_k`` / ``to_v`` projections.
Self-attention is untouched. ``alpha = 0`` is the plain processor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from stepdistill.kernels.attention import attention, check_backend


class NegativeSteeringAttnProcessor:
    """A diffusers attention processor: cross-attention steered away from ``negative_embeds``.

    It reproduces diffusers' ``AttnProcessor2_0`` (spatial norm, 4-D inputs, group norm,
    ``norm_cross``, ``norm_q`` / ``norm_k``, ``to_out``, residual connection, output rescaling) and
    adds ``- scale * Attn(Q, K-, V-)`` before ``to_out`` (SNOOPI's NASA, module docstring). The
    attention mask, when given, applies to the positive prompt's keys only. Called without
    ``encoder_hidden_states`` (self-attention) it is the plain processor.

    Args:
        negative_embeds: [B or 1, L, D] negative prompt embeddings (broadcast over the batch when 1),
            in the backbone's ``encoder_hidden_states`` space.
        scale: alpha, the weight of the negative attention (0: the plain processor).
        backend: attention kernel (``stepdistill.kernels.attention``: auto | sdpa | xformers | reference).
    """

    def __init__(self, negative_embeds: Tensor, scale: float = 0.5, backend: str = "auto") -> None:
        if negative_embeds.dim() != 3:
            raise ValueError(f"negative_embeds must be [B, L, D], got shape {tuple(negative_embeds.shape)}; "
                             "pass the negative prompt's encoder_hidden_states")
        check_backend(backend)  # fail early on an unknown or missing backend
        self.negative_embeds = negative_embeds
        self.scale = float(scale)
        self.backend = backend

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_shape = hidden_states.shape
        if hidden_states.dim() == 4:  # [B, C, H, W] -> [B, H*W, C]
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = split_heads(attn, attn.to_q(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        cross = encoder_hidden_states is not None
        context = encoder_hidden_states if cross else hidden_states
        mask = diffusers_mask(attn, attention_mask, context.shape[1], context.shape[0])
        out = attention(query, *keys_values(attn, context, cross), mask=mask, backend=self.backend)
        if cross:  # steer away from the negative prompt (called without a context: plain attention)
            negative = self.batched_negative(hidden_states.shape[0], hidden_states)
            out = out - self.scale * attention(query, *keys_values(attn, negative, cross), backend=self.backend)

        hidden_states = out.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if len(input_shape) == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(input_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def batched_negative(self, batch_size: int, like: Tensor) -> Tensor:
        """The negative embeddings [batch_size, L, D] on ``like``'s device and dtype."""
        negative = self.negative_embeds.to(device=like.device, dtype=like.dtype)
        if negative.shape[0] == batch_size:
            return negative
        if negative.shape[0] != 1:
            raise ValueError(f"negative prompt batch {negative.shape[0]} does not match the batch {batch_size}; "
                             f"pass 1 or {batch_size} negative prompts")
        return negative.expand(batch_size, -1, -1)


def keys_values(attn: Any, context: Tensor, cross: bool) -> tuple[Tensor, Tensor]:
    """K, V [B, heads, L, d] of ``context`` [B, L, D] through the layer's projections (and its
    ``norm_cross`` for a cross-attention context, as diffusers)."""
    if cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = split_heads(attn, attn.to_k(context))
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, split_heads(attn, attn.to_v(context))


def split_heads(attn: Any, x: Tensor) -> Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)


def diffusers_mask(attn: Any, attention_mask: Tensor | None, key_length: int, batch_size: int) -> Tensor | None:
    """diffusers' attention mask (prepared by the layer) as [B, heads, N or 1, key_length]."""
    if attention_mask is None:
        return None
    mask = attn.prepare_attention_mask(attention_mask, key_length, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


# --------------------------------------------------------------------------- installation
def cross_attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The diffusers ``Attention`` modules of ``model`` that attend to a context (``attn2``), by name."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, Attention) and m.is_cross_attention}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no cross-attention layers to steer; negative-prompt "
                         "steering needs a text-conditioned UNet (SD1.5 / SDXL style)")
    for name, layer in layers.items():
        if getattr(layer, "added_kv_proj_dim", None) is not None:
            raise ValueError(f"cross-attention {name!r} has added key/value projections, which negative-prompt "
                             "steering does not support; use an SD1.5 / SDXL style UNet")
    return layers


@contextmanager
def negative_prompt_steering(model: nn.Module, negative_embeds: Tensor, scale: float = 0.5,
                             backend: str = "auto") -> Iterator[NegativeSteeringAttnProcessor]:
    """Steer every cross-attention of ``model`` away from ``negative_embeds`` inside the block.

    Installs one ``NegativeSteeringAttnProcessor`` (SNOOPI's NASA, Nguyen et al. 2024) on each
    ``attn2`` of ``model`` (a ``UNet2DConditionModel`` or any module containing one), and restores
    the original processors on exit, also when the block raises.

    Args:
        model: the backbone called with ``encoder_hidden_states`` = the positive prompt embeddings.
        negative_embeds: [B or 1, L, D] negative prompt embeddings (same space as the positive ones).
        scale: alpha, the weight of the negative attention.
        backend: attention kernel (auto | sdpa | xformers | reference).
    Yields:
        the installed processor (shared by all layers).
    """
    processor = NegativeSteeringAttnProcessor(negative_embeds, scale=scale, backend=backend)
    layers = cross_attention_layers(model)
    originals = {name: layer.processor for name, layer in layers.items()}
    try:
        for layer in layers.values():
            layer.set_processor(processor)
        yield processor
    finally:
        for name, layer in layers.items():
            layer.set_processor(originals[name])

