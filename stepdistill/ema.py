"""Exponential moving average of a module's parameters (and a copy of its buffers)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from stepdistill.dtensors import whole


class EMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * param`` after each optimizer step.

    Args:
        model: the online module (not modified).
        decay: the EMA decay; 0 copies the online weights every update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step towards ``model`` (``decay`` overrides the module's own for this step)."""
        decay = self.decay if decay is None else float(decay)
        online = dict(model.named_parameters())
        for name, p in self.model.named_parameters():
            value = online[name].detach()  # a sharded student's EMA is sharded, or a whole copy
            value = value if isinstance(p, DTensor) else whole(value)
            p.lerp_(value.to(p.dtype), 1.0 - decay)
        online_buffers = dict(model.named_buffers())
        for name, b in self.model.named_buffers():
            b.copy_(online_buffers[name])
