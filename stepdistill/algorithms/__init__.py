"""Distillation algorithms: each declares its phases and returns losses; none owns an optimizer."""

from stepdistill.algorithms.base import Algorithm, Batch, LossOutput

__all__ = ["Algorithm", "Batch", "LossOutput"]
