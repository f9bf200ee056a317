"""The physical floor of a training iteration: plain PyTorch making the trainer's model calls.

What a user would write by hand for the same config: per step the algorithm's phase, that phase's
``requires_grad`` when the phase changes (so backward computes the same gradients), the same global
batch, the loss, ``backward``, gradient clipping when the config clips, the optimizer and
LR-schedule steps, ``after_step`` (e.g. a target network's EMA) and the generator's EMA when the
config keeps one. No accelerate, no mixed precision, no non-finite guard, no logging.
"""

from __future__ import annotations

import torch
from torch import nn

from stepdistill.algorithms.base import Algorithm, unwrap
from stepdistill.ema import EMA
from stepdistill.training.optim import OptimConfig, build_optimizer, build_schedule
from stepdistill.training.settings import TrainerConfig
from stepdistill.training.trainer import phase_parameters, slice_batch


class BareLoop:
    """``bare(step)`` runs optimizer step ``step`` of ``algorithm`` on ``batches(step, batch_size)``.

    Args:
        algorithm: a freshly built algorithm (its own copy, not the trainer's).
        batches: ``(step, size) -> Batch``, the trainer's own batches.
        config: the trainer settings (batch size, EMA decay).
        optim: the optimizer settings (per phase: AdamW, warm-up, clipping).
        device: where the trainer's modules live.
    """

    def __init__(self, algorithm: Algorithm, batches, config: TrainerConfig, optim: OptimConfig,
                 device: torch.device) -> None:
        self.algorithm, self.batches, self.batch_size = algorithm, batches, config.batch_size
        self.device = torch.device(device)
        algorithm.teacher.eval().requires_grad_(False)
        algorithm.to(self.device).train()
        self.params = phase_parameters(algorithm)
        self.settings = optim.for_phases(algorithm.phases)
        self.optimizers = {ph: build_optimizer(ps, self.settings[ph]) for ph, ps in self.params.items()}
        self.schedules = {ph: build_schedule(opt, self.settings[ph]) for ph, opt in self.optimizers.items()}
        generator: nn.Module = unwrap(algorithm.generator)
        self.ema = EMA(generator, config.ema_decay) if config.ema_decay is not None else None
        ids = {id(p) for p in generator.parameters()}
        self.ema_phases = {ph for ph, ps in self.params.items() if any(id(p) in ids for p in ps)}
        self.trainable_phase: str | None = None

    def __call__(self, step: int) -> torch.Tensor:
        """One optimizer step; returns the loss as a tensor (nothing waits for the device)."""
        phase = self.algorithm.phase(step)
        if phase != self.trainable_phase:
            self.trainable_phase = phase
            for name, params in self.params.items():
                for p in params:
                    p.requires_grad_(name == phase)
        batch = self.batches(step, self.batch_size)
        if self.device.type != "cpu":
            batch = slice_batch(batch, 0, len(batch), self.device)
        out = self.algorithm.loss(phase, batch, step)
        out.loss.backward()
        settings = self.settings[phase]
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params[phase], settings.max_grad_norm)
        self.optimizers[phase].step()
        self.schedules[phase].step()
        self.algorithm.after_step(phase, step)
        if self.ema is not None and phase in self.ema_phases:
            self.ema.update(unwrap(self.algorithm.generator))
        self.optimizers[phase].zero_grad(set_to_none=True)
        return out.loss
