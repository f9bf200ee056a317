"""SiD: the loss and its gradient, grad through the scores, phases, few-step k, CFG modes, GAN."""

import pytest
import torch
from algo_helpers import NULL, assert_only_the_phase_trains, labelled_batch, train_only

import stepdistill.algorithms.sid as sid_module
from stepdistill.algorithms.sid import SiD
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.losses import edm_denoising_loss, edm_weight, sid_generator_loss
from stepdistill.roles import Critic, Generator
from stepdistill.schedules import Prediction


# ----------------------------------------------------------------- the loss
def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64).float() for _ in range(3)]


def test_sid_loss_value_and_gradient_match_the_formula():
    x, y_r, y_f = _toy()
    x.requires_grad_(True)
    loss = sid_generator_loss(x, y_r, y_f, alpha=1.2)
    norm = (x.detach() - y_r).abs().mean(dim=(1, 2, 3))
    d = y_r - y_f
    fisher = d.pow(2).sum(dim=(1, 2, 3))
    expected = ((d * (y_r - x.detach())).sum(dim=(1, 2, 3)) - 1.2 * fisher) / norm
    torch.testing.assert_close(loss, expected)
    # the alpha term enters with a minus sign: L(alpha) = L(0) - alpha ||y_r - y_f||^2 / norm
    torch.testing.assert_close(loss, sid_generator_loss(x, y_r, y_f, alpha=0.0) - 1.2 * fisher / norm)
    assert (loss < sid_generator_loss(x, y_r, y_f, alpha=0.0)).all()
    loss.sum().backward()
    # y_r, y_f constant and the normaliser stop-grad: d/dx = (y_f - y_r) / norm, whatever alpha
    torch.testing.assert_close(x.grad, (y_f - y_r) / norm.reshape(-1, 1, 1, 1))


def test_sid_loss_gradient_through_the_scores_uses_alpha():
    """y_r = a x, y_f = b x: L = [(a - b)(a - 1) - alpha (a - b)^2] |x|^2 / sg(norm), so
    dL/dx = 2 [(a - b)(a - 1) - alpha (a - b)^2] x / norm."""
    x, _, _ = _toy(1)
    a, b = 0.7, 0.4
    for alpha in (0.0, 1.2):
        xg = x.clone().requires_grad_(True)
        sid_generator_loss(xg, a * xg, b * xg, alpha=alpha).sum().backward()
        norm = ((1 - a) * x).abs().mean(dim=(1, 2, 3), keepdim=True)
        coef = (a - b) * (a - 1) - alpha * (a - b) ** 2
        torch.testing.assert_close(xg.grad, 2 * coef * x / norm)


# ----------------------------------------------------------------- the algorithm
def test_phases_alternate_one_to_one_by_default(parts):
    assert [SiD(*parts).phase(s) for s in range(4)] == ["critic", "generator"] * 2
    algo = SiD(*parts, critic_updates_per_generator_update=2)
    assert [algo.phase(s) for s in range(6)] == ["critic", "critic", "generator"] * 2


@pytest.mark.parametrize("grad_through_scores", [True, False])
@pytest.mark.parametrize("phase", ["critic", "generator"])
def test_only_the_running_phase_gets_gradients(parts, phase, grad_through_scores):
    teacher, generator, critic = parts
    algo = SiD(teacher, generator, critic, grad_through_scores=grad_through_scores, gan_weight=1e-2)
    train_only(algo, phase)
    out = algo.loss(phase, labelled_batch(), step=1)
    out.loss.backward()
    assert_only_the_phase_trains((teacher, generator, critic), phase, out, {"sid_loss", "gan_generator_loss"})


def _capture_loss_inputs(monkeypatch):
    seen = {}

    def spy(x_g, y_real, y_fake, alpha=1.2):
        x_g.retain_grad()
        seen.update(x_g=x_g, y_real=y_real, y_fake=y_fake)
        return sid_generator_loss(x_g, y_real, y_fake, alpha)

    monkeypatch.setattr(sid_module, "sid_generator_loss", spy)
    return seen


def test_grad_through_scores_switches_the_gradient_path(parts, monkeypatch):
    teacher, _, critic = parts
    generator = Generator(teacher.denoiser, steps=1)
    seen = _capture_loss_inputs(monkeypatch)
    grads = {}
    for flag in (False, True):
        algo = SiD(teacher, generator, critic, grad_through_scores=flag, generator_loss_scale=100.0)
        train_only(algo, "generator")
        torch.manual_seed(5)  # the same x_g, t and noise for both settings
        algo.loss("generator", labelled_batch(), step=1).loss.backward()
        x_g, y_r, y_f = seen["x_g"], seen["y_real"], seen["y_fake"]
        assert (y_r.grad_fn is not None and y_f.grad_fn is not None) == flag
        grads[flag] = x_g.grad.clone()
        if not flag:  # y_r, y_f constants: 100 * mean_B of (y_f - y_r) / norm
            norm = (x_g.detach() - y_r).abs().mean(dim=(1, 2, 3), keepdim=True)
            torch.testing.assert_close(x_g.grad, 100.0 * (y_f - y_r) / norm / len(x_g))
    assert not torch.allclose(grads[False], grads[True])


@pytest.mark.parametrize("grad_through_scores", [True, False])
def test_generator_gradient_vanishes_when_the_critic_equals_the_teacher(parts, grad_through_scores):
    """Critic = unguided teacher copy: y_r == y_f as functions of x_t, so no gradient (through the
    scores the two paths cancel up to float32 summation order); with teacher CFG (2.0) there is one."""
    teacher, _, _ = parts
    generator = Generator(teacher.denoiser, steps=1)
    critic = Critic(teacher.denoiser).requires_grad_(False)
    totals = {}
    for scale in (1.0, 2.0):
        generator.zero_grad(set_to_none=True)
        algo = SiD(teacher, generator, critic, guidance_teacher=scale, grad_through_scores=grad_through_scores)
        torch.manual_seed(2)
        algo.loss("generator", labelled_batch(), 1).loss.backward()
        totals[scale] = sum(float(p.grad.abs().sum()) for p in generator.parameters())
    if not grad_through_scores:
        assert totals[1.0] == 0.0
    assert totals[1.0] < 1e-3 * totals[2.0], totals  # measured ratio 4e-4 with grad through the scores


# ----------------------------------------------------------------- few-step (backward simulation)
def _generator_calls(algo, step):
    """(t, grad enabled) of every generator call during the generator loss of ``step``."""
    calls = []
    handle = algo.generator.register_forward_pre_hook(
        lambda _m, args: calls.append((float(args[1][0]), torch.is_grad_enabled())))
    try:
        algo.loss("generator", labelled_batch(), step)
    finally:
        handle.remove()
    return calls


def test_few_step_trains_step_k_after_k_minus_1_simulated_steps(parts):
    teacher, generator, critic = parts
    grid = generator.grid().tolist()
    algos = [SiD(teacher, generator, critic, seed=7, grad_through_scores=False) for _ in range(2)]
    ks = []
    for step in range(12):
        per_process = []
        for rank, algo in enumerate(algos):  # two "processes" with different global RNG states
            torch.manual_seed(100 * rank + step)
            calls = _generator_calls(algo, step)
            k = len(calls)
            assert [g for _, g in calls] == [False] * (k - 1) + [True]  # k - 1 steps without grad
            assert [t for t, _ in calls] == pytest.approx(grid[:k])
            per_process.append(k)
        assert per_process[0] == per_process[1]
        ks.append(per_process[0])
    assert set(ks) == {1, 2, 3, 4}


# ----------------------------------------------------------------- guidance modes
def _conditions(module, algo, phase):
    labels = []
    handle = module.register_forward_pre_hook(lambda _m, args: labels.append(args[2].class_labels.tolist()))
    try:
        algo.loss(phase, labelled_batch(), 1)
    finally:
        handle.remove()
    return labels


@pytest.mark.parametrize("phase", ["critic", "generator"])
def test_cfg_modes_set_what_the_critic_and_teacher_see(parts, phase):
    teacher, generator, critic = parts
    generator = Generator(teacher.denoiser, steps=1)
    cond, null = [0, 1, 2, 0], [NULL] * 4
    zero = SiD(teacher, generator, critic, cfg_mode="zero")
    assert _conditions(critic, zero, phase) == [null]  # unconditional critic
    anti = SiD(teacher, generator, critic, cfg_mode="anti", guidance_eval_critic=-1.0)
    lsg = SiD(teacher, generator, critic, guidance_train_critic=1.5, guidance_eval_critic=1.0)
    if phase == "generator":
        assert _conditions(critic, anti, phase) == [cond + null]  # evaluated with (negative) CFG
        assert _conditions(critic, lsg, phase) == [cond]
        assert _conditions(teacher.denoiser, zero, phase) == [cond]  # teacher without CFG
        assert _conditions(teacher.denoiser, anti, phase) == [cond]
        assert _conditions(teacher.denoiser, lsg, phase) == [cond + null]  # the teacher's own 2.0
    else:
        assert _conditions(critic, anti, phase) == [cond]  # trained at guidance_train_critic = 1
        assert _conditions(critic, lsg, phase) == [cond + null]  # trained with CFG 1.5


def test_critic_trained_with_guidance_regresses_the_guided_output(parts, monkeypatch):
    teacher, _, critic = parts
    algo = SiD(teacher, Generator(teacher.denoiser, steps=1), critic, guidance_train_critic=1.5)
    seen, real = {}, sid_module.denoising_loss

    def spy(pred, target):
        seen["pred"] = pred
        return real(pred, target)

    monkeypatch.setattr(sid_module, "denoising_loss", spy)
    handle = critic.register_forward_pre_hook(lambda _m, args: seen.update(x_t=args[0], t=args[1]))
    algo.loss("critic", labelled_batch(), 0)
    handle.remove()
    labels = Conditioning.labels(torch.tensor([0, 1, 2, 0] + [NULL] * 4), NULL)
    with torch.no_grad():  # the batched [cond; null] forward, in the critic's own (eps) parameterization
        both = critic(seen["x_t"], seen["t"], labels, out=Prediction.EPS)
    torch.testing.assert_close(seen["pred"].detach(), both[4:] + 1.5 * (both[:4] - both[4:]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(cfg_mode="anti"), "guidance_eval_critic < 1"),
    (dict(cfg_mode="zero", guidance_teacher=2.0), "guidance_teacher"),
    (dict(cfg_mode="zero", guidance_eval_critic=1.5), "unconditional"),
    (dict(cfg_mode="nope"), "allowed: lsg, zero, anti"),
    (dict(t_min=0.9, t_max=0.8), "t_min < t_max"),
])
def test_contradictory_settings_are_one_line_errors(parts, kwargs, match):
    with pytest.raises(StepdistillError, match=match):
        SiD(*parts, **kwargs)


# ----------------------------------------------------------------- diffusion GAN
def test_gan_term_is_off_before_warmup_and_on_after(parts):
    teacher, generator, critic = parts
    algo = SiD(teacher, Generator(teacher.denoiser, steps=1), critic, gan_weight=0.5, gan_warmup_steps=4)
    assert [algo.gan_active(s) for s in (0, 3, 4, 9)] == [False, False, True, True]
    before, after = algo.loss("generator", labelled_batch(), 3), algo.loss("generator", labelled_batch(), 5)
    assert "gan_generator_loss" not in before.logs
    torch.testing.assert_close(before.loss, 100.0 * before.logs["sid_loss"])
    torch.testing.assert_close(after.loss, 100.0 * after.logs["sid_loss"] + 0.5 * after.logs["gan_generator_loss"])
    assert "gan_critic_loss" in algo.loss("critic", labelled_batch(), 0).logs  # the discriminator trains from step 0


def test_gan_needs_a_head_and_real_data_and_is_data_free_without_it(parts):
    teacher, generator, _ = parts
    with pytest.raises(StepdistillError, match="critic.head=true"):
        SiD(teacher, generator, Critic(teacher.denoiser), gan_weight=1e-2)
    algo = SiD(teacher, generator, Critic(teacher.denoiser))
    for phase in algo.phases:  # data-free: no batch.x0 needed
        assert torch.isfinite(algo.loss(phase, labelled_batch(x0=False), 1).loss)
    with pytest.raises(StepdistillError, match="needs real data"):
        SiD(*parts, gan_weight=1e-2).loss("critic", labelled_batch(x0=False), 0)


# ----------------------------------------------------------------- the critic's loss and range
def test_edm_denoising_loss_exact_values():
    """EDM (Karras et al. 2022, Table 1): lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    sigma_data = 0.5: lambda(0.5) = 0.5 / 0.0625 = 8, lambda(1) = 1.25 / 0.25 = 5, lambda(0.25) = 20."""
    torch.testing.assert_close(edm_weight(torch.tensor([0.5, 1.0, 0.25])),
                               torch.tensor([8.0, 5.0, 20.0], dtype=torch.float64))
    x0 = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[1.0, -1.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]]).reshape(2, 1, 2, 2)
    # mean squared errors 6 / 4 = 1.5 and 0.25: losses 8 * 1.5 = 12 and 5 * 0.25 = 1.25
    torch.testing.assert_close(edm_denoising_loss(pred, x0, torch.tensor([0.5, 1.0])), torch.tensor([12.0, 1.25]))
    # sigma_data = 1: lambda(1) = 2
    torch.testing.assert_close(edm_denoising_loss(pred, x0, torch.tensor([1.0, 1.0]), sigma_data=1.0),
                               torch.tensor([3.0, 0.5]))


def _critic_times(algo, calls=6):
    seen = []
    handle = algo.critic.register_forward_pre_hook(lambda _m, args: seen.append(args[1].detach().clone()))
    for step in range(calls):
        algo.loss("critic", labelled_batch(), step)
    handle.remove()
    return torch.cat(seen)


def test_critic_range_defaults_to_the_full_range_and_is_configurable(parts, monkeypatch):
    teacher, _, critic = parts
    schedule, drawn = teacher.schedule, []
    real = schedule.sample_time

    def spy(n, **kwargs):
        drawn.append((kwargs.get("t_min", 0.0), kwargs.get("t_max", 1.0)))
        return real(n, **kwargs)

    monkeypatch.setattr(schedule, "sample_time", spy)
    generator = Generator(teacher.denoiser, steps=1)
    SiD(teacher, generator, critic).loss("critic", labelled_batch(), 0)
    assert drawn == [(0.0, 1.0)]  # the behaviour before the option: the whole range
    algo = SiD(teacher, generator, critic, critic_t_min=0.02, critic_t_max=0.98)  # SiD-LSG's [20, 980)
    steps = _critic_times(algo) * 999
    assert steps.min() >= 20 - 1e-6 and steps.max() <= 979 + 1e-6


def test_edm_critic_loss_weights_the_x0_error_at_the_drawn_sigma(parts, monkeypatch):
    teacher, _, critic = parts
    algo = SiD(teacher, Generator(teacher.denoiser, steps=1), critic, guidance_train_critic=1.0,
               critic_loss="edm", critic_t_min=0.02, critic_t_max=0.98)
    seen, real = {}, sid_module.edm_denoising_loss

    def spy(x0_pred, x0, sigma):
        seen.update(pred=x0_pred, sigma=sigma)
        return real(x0_pred, x0, sigma)

    monkeypatch.setattr(sid_module, "edm_denoising_loss", spy)
    t = _critic_times(algo, calls=1)
    schedule = teacher.schedule
    assert ((t >= 0.02 - 1e-9) & (t <= 0.98 + 1e-9)).all()
    torch.testing.assert_close(seen["sigma"], schedule.sigma(t) / schedule.alpha(t))
    assert seen["pred"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(critic_loss="mse"), "allowed: eps_uniform, edm"),
    (dict(critic_t_min=0.5, critic_t_max=0.5), "critic_t_min < critic_t_max"),
])
def test_bad_critic_loss_settings_are_one_line_errors(parts, kwargs, match):
    with pytest.raises(StepdistillError, match=match):
        SiD(*parts, **kwargs)
