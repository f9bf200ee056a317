"""AGD: the loss is the MSE to the stored CFG output in the teacher's own parameterization, only the
adapters get gradients, and training on guided trajectories makes one forward reproduce CFG."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import NULL, tiny_parts

from stepdistill.algorithms.agd import AdapterGuidanceDistillation
from stepdistill.algorithms.base import Batch
from stepdistill.conditioning import Conditioning
from stepdistill.roles import AdapterGenerator
from stepdistill.schedules import Prediction


def _records(teacher, n: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    scale = 1.0 + 4.0 * torch.rand(n, generator=g)
    cond = Conditioning.labels(torch.arange(n) % 3, NULL)
    target = teacher.predict(x_t, t, cond, out=Prediction.EPS, guidance_scale=scale)
    return Batch(cond=cond, extras={"x_t": x_t, "t": t, "scale": scale, "target": target})


@pytest.fixture()
def agd():
    teacher, _, _ = tiny_parts()
    return AdapterGuidanceDistillation(teacher, AdapterGenerator(teacher.denoiser, dim=16, attn_dim=8))


def test_loss_is_the_mse_to_the_stored_cfg_output_and_only_adapters_learn(agd):
    batch = _records(agd.teacher)
    out = agd.loss("generator", batch, 0)
    base = agd.teacher.predict(batch.extras["x_t"], batch.extras["t"], batch.cond, out=Prediction.EPS,
                               guidance_scale=1.0)  # fresh adapters: the base model
    expected = (base - batch.extras["target"]).pow(2).flatten(1).mean(1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in agd.teacher.parameters())
    # zero-initialised output projections: only they get a gradient at the start
    grads = {n: p.grad for n, p in agd.generator.adapters.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("to_out.weight"))


def test_training_fits_the_guided_outputs(agd):
    opt = torch.optim.AdamW(agd.generator.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    batch = _records(agd.teacher, n=16)
    first = agd.loss("generator", batch, 0).loss.item()
    for step in range(100):
        opt.zero_grad()
        agd.loss("generator", batch, step).loss.backward()
        opt.step()
    with torch.no_grad():
        last = agd.loss("generator", batch, 0).loss.item()
    assert last < 0.5 * first, (first, last)  # (the toy2d integration test shows it on real trajectories)


def test_agd_needs_an_adapter_generator_and_trajectory_records(agd):
    teacher, generator, _ = tiny_parts()
    with pytest.raises(ValueError, match="AdapterGenerator"):
        AdapterGuidanceDistillation(teacher, generator)
    with pytest.raises(ValueError, match="trajectories"):
        agd.loss("generator", Batch(cond=Conditioning.labels(torch.zeros(2, dtype=torch.long), NULL)), 0)
