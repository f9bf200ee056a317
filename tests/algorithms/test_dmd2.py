"""DMD2: the distribution-matching gradient, GAN signs, phase schedule, and who gets gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from algo_helpers import assert_only_the_phase_trains, labelled_batch, train_only

from stepdistill.algorithms.dmd2 import DMD2
from stepdistill.errors import StepdistillError
from stepdistill.losses import (
    distribution_matching_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from stepdistill.roles import Critic, Generator


def test_dm_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    real, fake = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    distribution_matching_loss(x, real, fake).sum().backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(x.grad, (fake - real) / norm / 16)  # d/dx of 0.5 mean_CHW(g^2) = g / CHW


def test_dm_loss_weight_scales_each_sample_and_nan_is_zeroed():
    x = torch.ones(2, 4, requires_grad=True)
    real, fake = torch.zeros(2, 4), torch.full((2, 4), 2.0)
    distribution_matching_loss(x, real, fake, weight=torch.tensor([1.0, 3.0])).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5] * 4, [1.5] * 4]))  # (2 / 1) * w / 4
    x2 = torch.zeros(1, 4, requires_grad=True)
    distribution_matching_loss(x2, torch.zeros(1, 4), torch.full((1, 4), float("nan"))).sum().backward()
    assert torch.isfinite(x2.grad).all()


def test_gan_losses_have_the_right_signs():
    logits = torch.tensor([-2.0, 0.0, 2.0])
    assert (gan_generator_loss(logits).diff() < 0).all()  # the generator wants D(fake) high
    lo, hi = torch.tensor([-3.0]), torch.tensor([3.0])
    assert gan_discriminator_loss(hi, lo) < gan_discriminator_loss(lo, hi)  # D wants real high, fake low
    torch.testing.assert_close(gan_discriminator_loss(torch.zeros(1), torch.zeros(1)),
                               2 * torch.log(torch.tensor([2.0])))


def test_phase_schedule_is_the_two_time_scale_ratio(parts):
    algo = DMD2(*parts, critic_updates_per_generator_update=3)
    assert [algo.phase(s) for s in range(8)] == ["critic"] * 3 + ["generator"] + ["critic"] * 3 + ["generator"]


@pytest.mark.parametrize("phase", ["critic", "generator"])
def test_only_the_running_phase_gets_gradients(parts, phase):
    teacher, generator, critic = parts
    algo = DMD2(teacher, generator, critic, gan_generator_weight=1e-3, gan_critic_weight=1e-2)
    train_only(algo, phase)
    out = algo.loss(phase, labelled_batch(), step=0)
    out.loss.backward()
    assert_only_the_phase_trains((teacher, generator, critic), phase, out, {"dm_loss", "gan_generator_loss"})


def test_backward_simulation_draws_the_same_k_on_every_process(tmp_path):
    """Two torchrun processes with different noise (their global RNG seeded by rank) run the 4-step
    generator the same number of times at every step (k simulated steps + the trained one, every k
    in 0..3 drawn), while their samples differ: k comes from the shared generator, the noise does not."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent.parent), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(here / "backward_simulation_run.py"), str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1)]
    assert ranks[0]["counts"] == ranks[1]["counts"]
    assert set(ranks[0]["counts"]) == {1, 2, 3, 4}
    assert not torch.allclose(ranks[0]["outputs"], ranks[1]["outputs"])


def test_dm_gradient_vanishes_when_the_critic_equals_the_teacher(parts):
    """Fake score == real score (critic = unguided teacher copy, s_real = 1): the generator gets
    exactly zero gradient; with CFG (s_real = 2) it does not."""
    teacher, _, _ = parts
    generator = Generator(teacher.denoiser, steps=1)
    critic = Critic(teacher.denoiser).requires_grad_(False)
    for scale, expect_zero in ((1.0, True), (2.0, False)):
        generator.zero_grad(set_to_none=False)
        DMD2(teacher, generator, critic, guidance_scale=scale).loss("generator", labelled_batch(), 0).loss.backward()
        total = sum(float(p.grad.abs().sum()) for p in generator.parameters())
        assert (total == 0.0) == expect_zero, (scale, total)


def test_gan_weights_need_a_head(parts):
    teacher, generator, _ = parts
    with pytest.raises(StepdistillError, match="critic.head=true"):
        DMD2(teacher, generator, Critic(teacher.denoiser), gan_generator_weight=1e-3)


def test_gan_noise_levels_stay_below_gan_t_max(parts):
    """gan_t_max=0.3: every discriminator input (real and generated, in both phases) is noised at a
    table step <= 300 of 999, while the critic's denoising loss keeps the full range."""
    teacher, generator, critic = parts
    algo = DMD2(teacher, generator, critic, gan_generator_weight=1e-3, gan_critic_weight=1e-2, gan_t_max=0.3)
    limit = teacher.schedule.max_sample_time(0.3)
    assert limit == pytest.approx(300 / 999)
    gan_t, other_t = [], []

    def spy(_module, args, kwargs, _out):
        (gan_t if kwargs.get("logits") else other_t).append(args[1])

    hook = critic.register_forward_hook(spy, with_kwargs=True)
    torch.manual_seed(0)
    for step in range(4):
        for phase in ("critic", "generator"):
            algo.loss(phase, labelled_batch(), step)
    hook.remove()
    assert len(gan_t) == 4 * 3  # real + generated per critic phase, generated per generator phase
    assert float(torch.cat(gan_t).max()) <= limit + 1e-12
    assert float(torch.cat(other_t).max()) > 0.5  # the denoising and DM terms still reach high noise


def test_gan_t_max_must_be_a_fraction_of_the_range(parts):
    for bad in (0.0, 1.5):
        with pytest.raises(StepdistillError, match="gan_t_max"):
            DMD2(*parts, gan_generator_weight=1e-3, gan_critic_weight=1e-2, gan_t_max=bad)


def _backward_simulation_times(generator: Generator) -> set[int]:
    """The backbone timesteps ``student_sample`` runs the generator at over 24 draws of k."""
    from stepdistill.algorithms.common import student_sample

    seen = []
    forward = generator.forward
    generator.forward = lambda x, t, cond: seen.append(round(float(t[0]) * 999)) or forward(x, t, cond)
    for step in range(24):
        student_sample(generator, labelled_batch().cond, torch.Generator().manual_seed(step), grad=False)
    return set(seen)


def test_backward_simulation_runs_on_the_generators_own_timesteps(parts):
    """With generator.timesteps the graded step starts at one of them, each one over enough draws."""
    generator = Generator(parts[0].denoiser, steps=4, timesteps=[999, 400, 200, 50])
    assert _backward_simulation_times(generator) == {999, 400, 200, 50}


def test_backward_simulation_runs_on_the_training_timesteps(parts):
    """With generator.training_timesteps backward simulation uses them, never the sampling grid."""
    generator = Generator(parts[0].denoiser, steps=4, timesteps=[999, 600, 300, 100],
                          training_timesteps=[999, 400, 200, 50])
    assert _backward_simulation_times(generator) == {999, 400, 200, 50}
