"""f-distill: h(r) per divergence, the density ratio, its normalisation (one and two processes), the
h-weighted DM gradient, equivalence with DMD2 for reverse KL, and who gets gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from algo_helpers import assert_only_the_phase_trains, labelled_batch, train_only

from stepdistill.algorithms.base import Batch
from stepdistill.algorithms.dmd2 import DMD2
from stepdistill.algorithms.fdistill import (
    FDistill,
    RatioNormalizer,
    global_mean,
    normalized_f_weight,
)
from stepdistill.errors import StepdistillError
from stepdistill.losses import F_DIVERGENCES, density_ratio, f_divergence_weight
from stepdistill.roles import Critic

HERE = Path(__file__).resolve().parent

CLOSED_FORMS = {
    "reverse_kl": lambda r: [1.0 for _ in r],
    "forward_kl": lambda r: list(r),
    "js": lambda r: [v / (1 + v) for v in r],
    "softened_reverse_kl": lambda r: [1 / (1 + v) for v in r],
    "jeffreys": lambda r: [1 + v for v in r],
    "squared_hellinger": lambda r: [v ** 0.5 for v in r],
    "neyman_chi2": lambda r: [1 / v for v in r],
}


# ----------------------------------------------------------------- pure functions
@pytest.mark.parametrize("divergence", sorted(CLOSED_FORMS))
def test_h_matches_its_closed_form(divergence):
    r = [0.1, 0.5, 1.0, 2.0, 20.0]
    h = f_divergence_weight(torch.tensor(r, dtype=torch.float64), divergence)
    torch.testing.assert_close(h, torch.tensor(CLOSED_FORMS[divergence](r), dtype=torch.float64))


def test_the_table_is_exactly_the_documented_divergences():
    assert set(F_DIVERGENCES) == set(CLOSED_FORMS)


def test_unknown_divergence_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: reverse_kl, forward_kl, js"):
        f_divergence_weight(torch.ones(2), "kl")


def test_density_ratio_clamps_and_has_no_gradient():
    logits = torch.tensor([-50.0, -3.0, 0.0, 1.0, 2.5, 50.0], requires_grad=True)
    r = density_ratio(logits)
    assert not r.requires_grad
    e = torch.e
    torch.testing.assert_close(r, torch.tensor([0.1, 0.1, 1.0, e, e ** 2.5, 20.0]))
    # the logit clamp acts before exp: a clamp of 1 caps r at e even with a wide r range
    torch.testing.assert_close(density_ratio(logits, logit_clamp=1.0, r_min=1e-3, r_max=1e3),
                               torch.tensor([1 / e, 1 / e, 1.0, e, e, e]))


# ----------------------------------------------------------------- the normaliser
def test_normaliser_keeps_a_running_mean_per_time_bin():
    norm = RatioNormalizer(bins=10, momentum=0.9)
    t = torch.tensor([0.05, 0.01, 0.55, 0.59, 1.0])
    r = torch.tensor([1.0, 3.0, 8.0, 8.0, 5.0])
    out = norm(r, t)
    expected = torch.ones(10, dtype=torch.float64)
    expected[[0, 5, 9]] = torch.tensor([2.0, 8.0, 5.0], dtype=torch.float64)  # first batch sets a bin
    torch.testing.assert_close(norm.mean, expected)
    torch.testing.assert_close(norm.count, torch.tensor([2.0, 0, 0, 0, 0, 2, 0, 0, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([0.5, 1.5, 1.0, 1.0, 1.0], dtype=torch.float64))
    norm(torch.tensor([4.0]), torch.tensor([0.02]))  # later batches: an EMA, only in their own bin
    torch.testing.assert_close(norm.mean[[0, 5, 9]], torch.tensor([0.9 * 2 + 0.1 * 4, 8.0, 5.0], dtype=torch.float64))
    assert norm(torch.tensor([6.0]), torch.tensor([0.5]), update=False).item() == pytest.approx(6 / 8)
    assert {"mean", "count"} <= set(norm.state_dict())  # buffers: saved with the module's state


@pytest.mark.parametrize("divergence", sorted(CLOSED_FORMS))
def test_weight_has_mean_one_over_the_batch(divergence):
    g = torch.Generator().manual_seed(0)
    r, t = 0.1 + 10 * torch.rand(64, generator=g), torch.rand(64, generator=g)
    weight, h_mean = normalized_f_weight(r, t, RatioNormalizer(), divergence)
    assert weight.mean().item() == pytest.approx(1.0, abs=1e-12)
    assert (weight > 0).all() and h_mean > 0
    assert global_mean(torch.tensor([1.0, 2.0, 6.0])).item() == 3.0  # one process: the plain mean


def test_two_processes_share_the_normaliser_and_the_mean_of_h(tmp_path):
    """Under torchrun (2 CPU processes, gloo) the per-bin statistics and the mean of h are
    all-reduced: both processes hold the normaliser one process gets from the whole batch, and
    the weights have mean 1 over the global batch, not over each slice."""
    sys.path.insert(0, str(HERE))
    from fdistill_allreduce_run import PER_PROCESS, global_batch

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(HERE / "fdistill_allreduce_run.py"), str(tmp_path)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in (0, 1)]
    assert [rk["world_size"] for rk in ranks] == [2, 2]
    one, expected = RatioNormalizer(bins=10, momentum=0.5), []
    for seed in (0, 1):
        expected.append(normalized_f_weight(*global_batch(seed), one, "forward_kl")[0])
    for rk in ranks:
        for key, value in one.state_dict().items():
            torch.testing.assert_close(rk["state"][key], value)
    for i in range(2):
        both = torch.cat([ranks[0]["weights"][i], ranks[1]["weights"][i]])
        torch.testing.assert_close(both, expected[i])
        assert both.mean().item() == pytest.approx(1.0, abs=1e-12)
        assert abs(ranks[0]["weights"][i].mean().item() - 1.0) > 1e-3  # each slice alone is not normalised
    assert len(ranks[0]["weights"][0]) == PER_PROCESS


# ----------------------------------------------------------------- the algorithm
@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_generator_gradient_is_the_h_weighted_dm_gradient(parts, divergence):
    """d loss / d x (the generator's output) is h(r / EMA of r in t's bin) / mean(h) * (x0_fake - x0_real)
    / mean|x - x0_real| / (CHW B), with r = exp(logit) of the critic's head at the DM term's (x_t, t)."""
    teacher, generator, critic = parts
    algo = FDistill(teacher, generator, critic, divergence=divergence, gan_generator_weight=0.0, ratio_momentum=0.9)
    critic.requires_grad_(False)
    algo.ratio_normalizer.mean.fill_(2.0)  # a running mean of 2 in every bin: this batch is EMA'd in
    algo.ratio_normalizer.count.fill_(1.0)
    seen: dict[str, object] = {}

    def keep_output(_m, _args, out):
        if out.requires_grad:  # the graded step (backward simulation runs earlier steps without grad)
            out.retain_grad()
            seen["x"] = out

    def keep_critic_call(_m, args, kwargs, out):
        seen.setdefault("critic", (args, kwargs, out))

    hooks = [generator.register_forward_hook(keep_output),
             critic.register_forward_hook(keep_critic_call, with_kwargs=True)]
    algo.loss("generator", labelled_batch(), step=0).loss.backward()
    for hook in hooks:
        hook.remove()
    x = seen["x"]
    (x_t, t, cond), kwargs, (x0_fake, logits) = seen["critic"]
    assert kwargs["logits"] is True
    x0_real = teacher.predict(x_t, t, cond, guidance_scale=teacher.guidance_scale)
    r = logits.detach().clamp(-10, 10).exp().clamp(0.1, 20).double()
    bins = (t * 10).floor().long().clamp(max=9)
    bin_mean = torch.stack([0.9 * 2.0 + 0.1 * r[bins == b].mean() for b in bins])
    h = torch.tensor(CLOSED_FORMS[divergence]((r / bin_mean).tolist()), dtype=torch.float64)
    weight = (h / h.mean()).reshape(-1, 1, 1, 1)
    norm = (x.detach().double() - x0_real.double()).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = weight * (x0_fake.double() - x0_real.double()) / norm / (x[0].numel() * len(x))
    # the loss forms its target in float64 but subtracts it from x in float32: a few ulps of |x| per element
    atol = 4 * 2.0 ** -24 * float(x.detach().abs().max()) / (x[0].numel() * len(x))
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=atol)
    assert not torch.allclose(weight, torch.ones_like(weight))  # the weights really differ


def test_ratio_momentum_defaults_to_fastgens_zero(parts):
    """FastGen's default (and f-distill's): no momentum, each bin's mean is this batch's own."""
    assert FDistill(*parts).ratio_normalizer.momentum == 0.0
    norm = RatioNormalizer(bins=2)
    t = torch.tensor([0.1, 0.2, 0.7])
    norm.update(torch.tensor([1.0, 3.0, 5.0]), t)
    norm.update(torch.tensor([4.0, 8.0, 10.0]), t)
    torch.testing.assert_close(norm.mean, torch.tensor([6.0, 10.0], dtype=torch.float64))


@pytest.mark.parametrize("gan_generator_weight", [0.0, 1e-3])
def test_reverse_kl_is_dmd2(parts, gan_generator_weight):
    """h = 1: the generator loss and its gradient equal DMD2's bit for bit given the same seeds."""
    teacher, generator, critic = parts
    weights = dict(gan_generator_weight=gan_generator_weight, gan_critic_weight=1e-2, seed=3)
    runs = []
    for algo in (DMD2(teacher, generator, critic, **weights),
                 FDistill(teacher, generator, critic, divergence="reverse_kl", **weights)):
        generator.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out = algo.loss("generator", labelled_batch(), step=7)
        out.loss.backward()
        runs.append((out, [p.grad.clone() for p in generator.parameters()]))
    (dmd2, dmd2_grads), (fdistill, fdistill_grads) = runs
    assert torch.equal(dmd2.loss, fdistill.loss)
    assert torch.equal(dmd2.logs["dm_loss"], fdistill.logs["dm_loss"])
    assert all(torch.equal(a, b) for a, b in zip(dmd2_grads, fdistill_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in dmd2_grads)
    assert fdistill.logs["h_mean"] == 1.0 and {"ratio_mean", "weight_max"} <= set(fdistill.logs)


@pytest.mark.parametrize("phase", ["critic", "generator"])
def test_only_the_running_phase_gets_gradients(parts, phase):
    teacher, generator, critic = parts
    algo = FDistill(teacher, generator, critic)
    train_only(algo, phase)
    out = algo.loss(phase, labelled_batch(), step=0)
    out.loss.backward()
    assert_only_the_phase_trains(parts, phase, out, {"dm_loss", "gan_generator_loss", "ratio_mean", "h_mean",
                                                     "weight_max"})
    if phase == "critic":  # the discriminator head (the ratio estimator) trains with the critic
        assert {"logit_real", "logit_fake"} <= set(out.logs)
    else:
        assert algo.ratio_normalizer.count.sum() == len(labelled_batch())  # the DM term's r updated it


def test_phase_schedule_and_checkpointed_state(parts):
    algo = FDistill(*parts, critic_updates_per_generator_update=3)
    assert [algo.phase(s) for s in range(8)] == ["critic"] * 3 + ["generator"] + ["critic"] * 3 + ["generator"]
    assert {"ratio_normalizer.mean", "ratio_normalizer.count"} <= set(algo.state_dict())
    assert "ratio_normalizer" not in algo.modules_to_prepare()


def test_configuration_errors_are_clear(parts):
    teacher, generator, critic = parts
    with pytest.raises(StepdistillError, match="algorithm.divergence='kl'.*allowed: reverse_kl"):
        FDistill(teacher, generator, critic, divergence="kl")
    with pytest.raises(StepdistillError, match="critic.head=true"):
        FDistill(teacher, generator, Critic(teacher.denoiser))
    with pytest.raises(StepdistillError, match="gan_critic_weight > 0"):
        FDistill(teacher, generator, critic, gan_critic_weight=0.0)
    with pytest.raises(StepdistillError, match="needs real data"):
        FDistill(teacher, generator, critic).loss("critic", Batch(labelled_batch().cond), step=0)


def test_ratio_is_one_beyond_the_discriminators_noise_range(parts):
    """gan_t_max=0.3: the discriminator only ever sees t <= 300/999, so at the DM term's noise levels
    above that r is read as 1 (logit 0); below it the head's own logit is used."""
    teacher, generator, critic = parts
    algo = FDistill(teacher, generator, critic, divergence="forward_kl", gan_generator_weight=0.0, gan_t_max=0.3)
    limit = teacher.schedule.max_sample_time(0.3)
    raw, used = [], []
    critic.register_forward_hook(lambda _m, a, kw, out: raw.append((a[1], out[1])) if kw.get("logits") else None,
                                 with_kwargs=True)
    original = algo.ratio_weight
    algo.ratio_weight = lambda logits, t: (used.append(logits), original(logits, t))[1]
    torch.manual_seed(0)
    for step in range(6):
        algo.loss("generator", labelled_batch(), step)
    t = torch.cat([t for t, _ in raw])
    head, seen = torch.cat([logits for _, logits in raw]), torch.cat(used)
    beyond = t > limit + 1e-9
    assert beyond.any() and (~beyond).any()
    assert (seen[beyond] == 0).all()
    torch.testing.assert_close(seen[~beyond], head[~beyond])
    assert (head[~beyond] != 0).all()
