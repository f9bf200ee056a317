"""The Algorithm interface every distillation method implements.

An algorithm owns its networks (generator, critic, heads) and the maths, and nothing else: no
optimizer, accelerator, file or config object. It declares its phases, decides in one place
(``phase``) which phase a step runs, lists what each phase trains (``trainable``), and returns a
``LossOutput`` for a phase. The trainer owns optimizers (one per phase), ``accelerator.prepare``,
``requires_grad``, clipping, EMA, checkpoints and logging.

Randomness: algorithms draw from torch's global RNG (seeded per process by the trainer), except
choices that must agree on every process (e.g. the backward-simulation step count k), which come
from ``shared_generator(step)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from stepdistill.batch import Batch
from stepdistill.conditioning import Conditioning
from stepdistill.roles import Generator, Teacher


@dataclass
class LossOutput:
    """A phase's scalar loss and what to log (floats or 0-d tensors, detached by the trainer)."""

    loss: Tensor
    logs: dict[str, float | Tensor] = field(default_factory=dict)


class Algorithm(nn.Module):
    """Base class: subclasses set ``phases`` (and ``trains_on_trajectories``) and implement
    ``trainable`` and ``loss``.

    Args:
        teacher: the frozen teacher (not a submodule that trains; never prepared for training).
        generator: the student.
        seed: seed of ``shared_generator`` (choices identical on every process).
    """

    phases: tuple[str, ...] = ("generator",)
    #: trains on the teacher's stored guided trajectories (``stepdistill.data.trajectories``, the
    #: experiment's ``trajectories`` node) instead of the task's batches: AGD
    trains_on_trajectories: bool = False

    def __init__(self, teacher: Teacher, generator: Generator, seed: int = 0) -> None:
        super().__init__()
        self.teacher = teacher
        self.generator = generator
        self.seed = int(seed)

    # ----------------------------------------------------------------- schedule of phases
    def phase(self, step: int) -> str:
        """The phase that optimizer step ``step`` (0-based) runs. The one place that decides it."""
        return self.phases[step % len(self.phases)]

    def trainable(self, phase: str) -> list[nn.Module]:
        """The modules whose parameters the ``phase`` optimizer updates (all others are frozen)."""
        raise NotImplementedError

    def loss(self, phase: str, batch: Batch, step: int) -> LossOutput:
        """The scalar loss of ``phase`` on ``batch`` at optimizer step ``step``."""
        raise NotImplementedError

    def after_step(self, phase: str, step: int) -> None:
        """Called by the trainer after optimizer step ``step`` of ``phase`` was applied (not after a
        skipped one): for state the algorithm keeps outside the optimizer, e.g. an EMA target network."""

    # ----------------------------------------------------------------- helpers
    def shared_generator(self, step: int) -> torch.Generator:
        """A CPU generator seeded by (seed, step): the same draws on every process."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def parameters_of(self, phase: str) -> list[nn.Parameter]:
        seen, out = set(), []
        for module in self.trainable(phase):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def modules_to_prepare(self) -> dict[str, nn.Module]:
        """Attribute name -> module for every module some phase trains (for accelerate.prepare)."""
        out: dict[str, nn.Module] = {}
        for phase in self.phases:
            for module in self.trainable(phase):
                for name, child in self.named_children():
                    if child is module:
                        out[name] = module
        return out

    def train(self, mode: bool = True) -> Algorithm:
        super().train(mode)
        self.teacher.train(False)
        return self

    @torch.no_grad()
    def sample(self, noise: Tensor, cond: Conditioning, steps: int | None = None,
               generator: torch.Generator | None = None) -> Tensor:
        """Samples of the (online) student: x0 [B, ...]."""
        return unwrap(self.generator).sample(noise, cond, steps, generator=generator)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / FSDP / compiled wrapper."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)
