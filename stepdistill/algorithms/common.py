"""Pieces several algorithms share (without inheriting from one another)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stepdistill.algorithms.base import unwrap
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
