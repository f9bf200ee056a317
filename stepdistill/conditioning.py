"""What a denoiser is conditioned on: class labels, prompt embeddings (SD1.5 / SDXL / SD3), or nothing.

A ``Conditioning`` carries its own null condition (the unconditional class index, or the
empty-prompt embedding), so classifier-free guidance and condition dropout need no outside help.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

_BATCHED = ("class_labels", "prompt_embeds", "pooled_embeds", "time_ids", "guidance")


@dataclass
class Conditioning:
    """A batch of conditions.

    Attributes:
        class_labels: [B] long, class indices (``null_class`` means unconditional).
        prompt_embeds: [B, L, D] text-encoder hidden states.
        pooled_embeds: [B, P] pooled text embeddings (SDXL, SD3).
        time_ids: [B, 6] SDXL's added time ids (original size, crop, target size).
        guidance: [B] float, the CFG scale s a guidance-embedded student is asked to reproduce
            (LCM's w embedding, in the ``u + s (c - u)`` convention); teachers and critics ignore it.
        null_class: the class index used for the unconditional branch.
        null_prompt_embeds: [1, L, D] the empty-prompt embedding.
        null_pooled_embeds: [1, P] its pooled embedding.
        batch_size: the batch size when no tensor is present (unconditional models).
    """

    class_labels: Tensor | None = None
    prompt_embeds: Tensor | None = None
    pooled_embeds: Tensor | None = None
    time_ids: Tensor | None = None
    guidance: Tensor | None = None
    null_class: int | None = None
    null_prompt_embeds: Tensor | None = None
    null_pooled_embeds: Tensor | None = None
    batch_size: int | None = None

    # ----------------------------------------------------------------- constructors
    @classmethod
    def labels(cls, class_labels: Tensor, null_class: int) -> Conditioning:
        return cls(class_labels=torch.as_tensor(class_labels).long(), null_class=int(null_class))

    @classmethod
    def none(cls, batch_size: int) -> Conditioning:
        return cls(batch_size=batch_size)

    # ----------------------------------------------------------------- queries
    @property
    def kind(self) -> str:
        if self.class_labels is not None:
            return "class"
        if self.prompt_embeds is not None:
            return "text"
        return "none"

    def __len__(self) -> int:
        for name in _BATCHED:
            v = getattr(self, name)
            if v is not None:
                return int(v.shape[0])
        if self.batch_size is None:
            raise ValueError("an empty Conditioning needs batch_size")
        return self.batch_size

    def with_guidance(self, scale: float | Tensor) -> Conditioning:
        """This batch with ``guidance`` set to ``scale`` (a float or a [B] tensor)."""
        like = next((getattr(self, n) for n in _BATCHED[:-1] if getattr(self, n) is not None), None)
        device = like.device if like is not None else None
        scale = torch.as_tensor(scale, dtype=torch.float32, device=device)
        return replace(self, guidance=scale.expand(len(self)).clone() if scale.dim() == 0 else scale)

    @property
    def has_null(self) -> bool:
        return self.kind == "none" or self.null_class is not None or self.null_prompt_embeds is not None

    # ----------------------------------------------------------------- transforms
    def _map(self, fn) -> Conditioning:
        """Apply ``fn`` to every batched tensor; keep the null condition as is."""
        changes = {n: fn(getattr(self, n)) for n in _BATCHED if getattr(self, n) is not None}
        out = replace(self, **changes)
        if self.kind == "none":
            out.batch_size = int(fn(torch.empty(len(self))).shape[0])
        return out

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditioning:
        def move(v: Tensor | None) -> Tensor | None:
            if v is None:
                return None
            return v.to(device, dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    def index(self, idx: Tensor | slice) -> Conditioning:
        return self._map(lambda v: v[idx])

    def repeat(self, n: int) -> Conditioning:
        """Each condition repeated ``n`` times in a row: [c0, c0, ..., c1, c1, ...]."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def null(self) -> Conditioning:
        """The unconditional version of this batch (same size)."""
        b = len(self)
        if self.kind == "none":
            return self
        if self.kind == "class":
            if self.null_class is None:
                raise ValueError("no null class: the model was not trained for classifier-free guidance")
            return replace(self, class_labels=torch.full_like(self.class_labels, self.null_class))
        if self.null_prompt_embeds is None:
            raise ValueError("no empty-prompt embedding: encode prompts with a null embedding for CFG")
        pooled = None
        if self.pooled_embeds is not None and self.null_pooled_embeds is not None:
            pooled = self.null_pooled_embeds.expand(b, -1).to(self.pooled_embeds)
        embeds = self.null_prompt_embeds.expand(b, -1, -1).to(self.prompt_embeds)
        return replace(self, prompt_embeds=embeds, pooled_embeds=pooled)

    def drop(self, mask: Tensor) -> Conditioning:
        """Replace the conditions where ``mask`` [B] is True by the null condition (CFG dropout)."""
        if self.kind == "none":
            return self
        return self.where(mask, self.null())

    def where(self, mask: Tensor, other: Conditioning) -> Conditioning:
        """Per-sample choice: ``other`` where ``mask`` [B] is True, else ``self``."""
        changes = {}
        for name in _BATCHED:
            a, b = getattr(self, name), getattr(other, name)
            if a is not None and b is not None:
                m = mask.to(a.device).reshape(-1, *([1] * (a.dim() - 1)))
                changes[name] = torch.where(m, b, a)
        return replace(self, **changes)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate batches along dim 0 (null conditions taken from the first item)."""
        first = items[0]
        changes = {}
        for name in _BATCHED:
            if getattr(first, name) is not None:
                changes[name] = torch.cat([getattr(c, name) for c in items], dim=0)
        out = replace(first, **changes)
        if first.kind == "none":
            out.batch_size = sum(len(c) for c in items)
        return out
