"""Pieces several algorithms share (without inheriting from one another)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.algorithms.base import Algorithm, Batch, LossOutput, unwrap
from stepdistill.conditioning import Conditioning
from stepdistill.sampling import simulate_to_step


def student_sample(generator: nn.Module, cond: Conditioning, shared: torch.Generator, *, grad: bool) -> Tensor:
    """Generator output x0 [B, ...] for ``cond``. K-step generators train with backward simulation
    (DMD2 Sec. 4.5; few-step SiD): draw k in 0..K-1 from ``shared`` (the same on every process), run
    k generator steps without grad from fresh noise, and return step k's output (with grad if asked).

    Args:
        generator: the (possibly DDP-wrapped) ``Generator``; the graded call goes through the wrapper.
        shared: a generator seeded identically on every process (``Algorithm.shared_generator(step)``).
    """
    gen = unwrap(generator)
    grid = gen.grid()
    k = int(torch.randint(len(grid), (1,), generator=shared)) if len(grid) > 1 else 0
    device = next(gen.parameters()).device
    noise = torch.randn(len(cond), *gen.denoiser.sample_shape, device=device)
    x_k = simulate_to_step(lambda x, t: gen(x, t, cond), gen.schedule, noise, grid, k)
    t_k = grid[k].expand(len(cond)).to(device)
    with torch.set_grad_enabled(grad):
        return generator(x_k, t_k, cond)


class CriticGeneratorAlgorithm(Algorithm):
    """The two-phase skeleton DMD2, f-distill and SiD share (none inherits another): a critic phase
    and a generator phase on DMD2's two time-scale rule, ``ratio`` critic steps then one generator
    step (Sec. 4.2; ratio 1 is SiD's 1:1 alternation). Subclasses set ``self.critic`` and
    ``self.ratio`` and implement ``_critic_loss`` and ``_generator_loss``."""

    phases = ("critic", "generator")
    critic: nn.Module
    ratio: int

    def phase(self, step: int) -> str:
        return "generator" if step % (self.ratio + 1) == self.ratio else "critic"

    def trainable(self, phase: str) -> list[nn.Module]:
        return {"critic": [self.critic], "generator": [self.generator]}[phase]

    def loss(self, phase: str, batch: Batch, step: int) -> LossOutput:
        if phase == "generator":
            return self._generator_loss(batch, step)
        if phase == "critic":
            return self._critic_loss(batch, step)
        raise ValueError(f"unknown phase {phase!r}; {type(self).__name__} phases: {self.phases}")

    def _generator_loss(self, batch: Batch, step: int) -> LossOutput:
        raise NotImplementedError

    def _critic_loss(self, batch: Batch, step: int) -> LossOutput:
        raise NotImplementedError

    def _noised(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor, Conditioning]:
        """(x_t, t, cond) at a fresh noise level over the full range (the GAN's inputs)."""
        t = self.teacher.schedule.sample_time(len(x), device=x.device)
        return self.teacher.schedule.add_noise(x, torch.randn_like(x), t), t, cond
