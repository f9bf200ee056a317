"""``Batch``: one training batch, what data sources yield and algorithms train on."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from stepdistill.conditioning import Conditioning


@dataclass
class Batch:
    """One training batch: real data (None for data-free methods) and its conditions.

    Attributes:
        x0: [B, ...] real samples (pixels or latents), or None.
        cond: the conditions to generate for (class labels / prompt embeddings / none).
        extras: other per-sample tensors [B, ...] an algorithm reads (AGD's stored trajectory
            records: ``x_t``, ``t``, ``scale``, ``target``).
    """

    cond: Conditioning
    x0: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cond)
