"""Adapter guidance distillation (AGD; Jensen et al. 2025, "Efficient Distillation of Classifier-Free
Guidance using Adapters").

The base network stays frozen; ``GuidanceAdapters`` (``stepdistill.adapters``, zero-initialised, ~2%
of the base's parameters) learn to reproduce the teacher's CFG output at any scale w in one forward.
Training data are the teacher's own CFG-guided trajectories (``stepdistill.data.trajectories``:
w drawn per trajectory from [w_min, w_max]), not noised real data: the paper's fix for the mismatch
between training and guided sampling. The loss is the MSE to the stored guided output in the
teacher's own parameterization (Sec. 3). One phase, one optimizer (the adapters').
"""

from __future__ import annotations

from torch import nn

from stepdistill.algorithms.base import Algorithm, Batch, LossOutput
from stepdistill.losses import guidance_distillation_loss
from stepdistill.roles import AdapterGenerator, Teacher

REQUIRED = ("x_t", "t", "scale", "target")


class AdapterGuidanceDistillation(Algorithm):
    """AGD: train the adapters of an ``AdapterGenerator`` on stored guided trajectories.

    Args:
        teacher: the frozen base with CFG (it collected the trajectories; AGD itself never calls it).
        generator: an ``AdapterGenerator`` on the teacher's network.
        seed: seed of ``shared_generator`` (unused: AGD draws nothing itself).
    """

    phases = ("generator",)
    trains_on_trajectories = True

    def __init__(self, teacher: Teacher, generator: AdapterGenerator, seed: int = 0) -> None:
        if not isinstance(generator, AdapterGenerator):
            raise ValueError("AGD trains guidance adapters: set generator._target_ to "
                             "stepdistill.roles.AdapterGenerator")
        super().__init__(teacher, generator, seed)

    def trainable(self, phase: str) -> list[nn.Module]:
        return [self.generator]

    def loss(self, phase: str, batch: Batch, step: int) -> LossOutput:
        missing = [k for k in REQUIRED if k not in batch.extras]
        if missing:
            raise ValueError(f"AGD trains on stored trajectories, the batch lacks {missing}: give the experiment "
                             "a `trajectories` node (stepdistill.data.trajectories.TrajectorySettings)")
        records = batch.extras
        native = self.teacher.denoiser.prediction
        cond = batch.cond.with_guidance(records["scale"])
        pred = self.generator(records["x_t"], records["t"], cond, out=native)
        per_sample = guidance_distillation_loss(pred, records["target"])
        return LossOutput(per_sample.mean(), {"scale_mean": records["scale"].mean()})
