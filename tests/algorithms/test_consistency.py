"""Consistency distillation (issue 5): the student's boundary form and sampler against diffusers'
LCMScheduler, the solver step and its inverse, the LCM and multistep-CD targets against the
formulas, what trains, and the EMA target network."""

from __future__ import annotations

import pytest
import torch
from algo_helpers import NULL, labelled_batch, tiny_parts
from diffusers import LCMScheduler

from stepdistill.algorithms.consistency import ConsistencyDistillation, consistency_weights
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.roles import ConsistencyGenerator
from stepdistill.sampling import ddim_invert, ddim_jump
from stepdistill.schedules import NoiseSchedule


def lcm_parts(**generator_kwargs):
    teacher, _, _ = tiny_parts()
    generator = ConsistencyGenerator(teacher.denoiser, **{"steps": 4, "solver_steps": 50, **generator_kwargs})
    with torch.no_grad():  # a student that differs from its teacher
        for p in generator.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return teacher, generator


def lcm_scheduler(**kwargs) -> LCMScheduler:
    """diffusers' LCMScheduler on the test teacher's table (linear betas 1e-4 .. 0.02, eps)."""
    return LCMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon",
                        clip_sample=False, set_alpha_to_one=True, original_inference_steps=50,
                        timestep_scaling=10.0, **kwargs)


def test_boundary_scalings_equal_lcm_schedulers():
    _, generator = lcm_parts()
    scheduler = lcm_scheduler()
    timesteps = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = generator.boundary_scalings(generator.schedule.from_model_time(timesteps))
    for i, step in enumerate(timesteps.tolist()):
        ref_skip, ref_out = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert float(c_skip[i]) == pytest.approx(ref_skip, rel=1e-9, abs=1e-15)
        assert float(c_out[i]) == pytest.approx(ref_out, rel=1e-9)
    assert (float(c_skip[0]), float(c_out[0])) == (1.0, 0.0)  # the boundary: f(x, 0) = x


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_k_step_grid_is_lcm_schedulers_selection(steps):
    _, generator = lcm_parts()
    scheduler = lcm_scheduler()
    scheduler.set_timesteps(steps)
    ours = generator.schedule.to_model_time(generator.grid(steps)).round().long()
    assert ours.tolist() == scheduler.timesteps.tolist()
    assert generator.solver_grid()[-1] == 0 and len(generator.solver_grid()) == 51


@pytest.mark.parametrize("steps", [1, 4])
def test_sampling_equals_lcm_scheduler_loop(steps):
    """Our K-step samples equal diffusers' LCMScheduler loop over the same UNet and seed."""
    _, generator = lcm_parts()
    labels = torch.tensor([0, 1, 2])
    g = torch.Generator().manual_seed(7)
    ours = generator.sample(torch.randn(3, 1, 8, 8, generator=g), Conditioning.labels(labels, NULL), steps,
                            generator=g)
    scheduler, unet = lcm_scheduler(), generator.denoiser.backbone
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 8, 8, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("schedule", [NoiseSchedule.vp("linear", 1000, 1e-4, 0.02), NoiseSchedule.flow(3.0)])
def test_solver_jump_and_its_inverse(schedule):
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t, t_next = torch.tensor([0.9, 0.6, 0.5, 0.3]), torch.tensor([0.5, 0.2, 0.0, 0.1])
    x_next = ddim_jump(schedule, x_t, x0, t, t_next)
    # alpha(t') x0 + sigma(t') eps_hat, eps_hat = (x_t - alpha(t) x0) / sigma(t); x0 itself at t' = 0
    eps = (x_t - schedule.alpha(t)[:, None] * x0) / schedule.sigma(t)[:, None]
    expected = schedule.alpha(t_next)[:, None] * x0 + schedule.sigma(t_next)[:, None] * eps
    expected[2] = x0[2]
    torch.testing.assert_close(x_next, expected)
    torch.testing.assert_close(ddim_invert(schedule, x_next, x_t, t, t_next), x0)


def test_lcm_target_is_one_teacher_step_then_the_target_network():
    teacher, generator = lcm_parts()
    algo = ConsistencyDistillation(teacher, generator, target_decay=0.95)
    batch, schedule = labelled_batch(), teacher.schedule
    grid = generator.solver_grid()
    t, t_prev, t_edge = grid[[0, 10, 49, 30]], grid[[1, 11, 50, 31]], torch.zeros(4, dtype=torch.float64)
    x_t = schedule.add_noise(batch.x0, torch.randn_like(batch.x0), t)
    with torch.no_grad():
        target = algo._target_x0(x_t, t, t_prev, t_edge, batch, batch.cond, 2.0)
        x0_teacher = teacher.predict(x_t, t, batch.cond, guidance_scale=2.0)
        x_prev = ddim_jump(schedule, x_t, x0_teacher, t, t_prev)
        expected = algo.target.model(x_prev, t_prev, batch.cond)  # the EMA copy, = the student at the start
    expected[2] = x0_teacher[2]  # t_{n-1} = 0: the teacher's own x0 is the target
    torch.testing.assert_close(target, expected)
    torch.testing.assert_close(expected[[0, 1, 3]], generator(x_prev, t_prev, batch.cond)[[0, 1, 3]].detach())


def test_multistep_target_makes_the_students_jump_land_on_the_segment_edge():
    teacher, generator = lcm_parts(solver_steps=8, timestep_scaling=None, sampler="ode")
    algo = ConsistencyDistillation(teacher, generator, segments=2, target_decay=0.0)
    grid = generator.solver_grid()  # 8 steps: segment edges at grid[4] and 0
    torch.manual_seed(3)
    t, t_prev, t_edge = algo._times(generator, 400, 2, "cpu")
    starts = {round(float(a), 6): round(float(e), 6) for a, e in zip(t, t_edge, strict=True)}
    assert len(starts) == 8
    for i in range(8):
        assert starts[round(float(grid[i]), 6)] == round(float(grid[4] if i < 4 else 0.0), 6)
    batch, schedule = labelled_batch(), teacher.schedule
    t, t_prev, t_edge = grid[[0, 2, 3, 6]], grid[[1, 3, 4, 7]], grid[[4, 4, 4, 8]]
    x_t = schedule.add_noise(batch.x0, torch.randn_like(batch.x0), t)
    with torch.no_grad():
        target = algo._target_x0(x_t, t, t_prev, t_edge, batch, batch.cond, 2.0)
        x_prev = ddim_jump(schedule, x_t, teacher.predict(x_t, t, batch.cond, guidance_scale=2.0), t, t_prev)
        x_edge = ddim_jump(schedule, x_prev, generator(x_prev, t_prev, batch.cond), t_prev, t_edge)
    x_edge[2] = x_prev[2]  # t_{n-1} is the edge: the teacher's step is the target state
    torch.testing.assert_close(ddim_jump(schedule, x_t, target, t, t_edge), x_edge, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("loss", ["huber", "huber_ict", "l2"])
def test_only_the_student_trains(loss):
    teacher, generator = lcm_parts()
    algo = ConsistencyDistillation(teacher, generator, loss=loss)
    out = algo.loss("generator", labelled_batch(), step=0)
    out.loss.backward()
    assert out.loss.item() > 0 and set(out.logs) == {"consistency_loss"}
    assert all(p.grad is not None for p in generator.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in algo.target.model.parameters())
    assert algo.trainable("generator") == [generator] and algo.phase(5) == "generator"


def test_ict_weights_follow_the_formula_and_favour_low_noise():
    schedule = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    grid = schedule.timesteps(50, 0.7)
    weights = consistency_weights(schedule, grid, grid[:-1], grid[1:])
    lam = [1 / (float(schedule.sigma(a) / schedule.alpha(a)) - float(schedule.sigma(b) / schedule.alpha(b)))
           for a, b in zip(grid[:-1], grid[1:], strict=True)]
    torch.testing.assert_close(weights, torch.tensor(lam, dtype=torch.float64) / (sum(lam) / 50))
    assert weights[-1] > 20 * weights[0] and abs(float(weights.mean()) - 1.0) < 1e-12
    squared = consistency_weights(schedule, grid, grid[:-1], grid[1:], power=2.0)
    lam2 = torch.tensor(lam, dtype=torch.float64) ** 2
    torch.testing.assert_close(squared, lam2 / lam2.mean())
    assert squared[-1] / squared[0] == pytest.approx(float(weights[-1] / weights[0]) ** 2)
    flow_grid = NoiseSchedule.flow(3.0).timesteps(50)  # t = 1 is sigma = inf: the smallest weight, not 0
    flow = consistency_weights(NoiseSchedule.flow(3.0), flow_grid, flow_grid[:-1], flow_grid[1:])
    assert torch.isfinite(flow).all() and abs(float(flow.mean()) - 1.0) < 1e-12
    assert flow[0] == flow[1:].min() > 0 and flow[-1] > flow[1]


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_ict_weighting_scales_each_samples_loss(monkeypatch, power):
    import stepdistill.algorithms.consistency as module

    teacher, generator = lcm_parts()
    algo = ConsistencyDistillation(teacher, generator, weighting="ict", weighting_power=power, target_decay=0.0)
    seen = {}
    times, distance = algo._times, module.consistency_loss
    monkeypatch.setattr(algo, "_times", lambda *a: seen.setdefault("times", times(*a)))
    monkeypatch.setattr(module, "consistency_loss", lambda *a: seen.setdefault("per_sample", distance(*a)))
    loss = algo.loss("generator", labelled_batch(), step=0).loss
    t, t_prev, _ = seen["times"]
    weights = consistency_weights(teacher.schedule, generator.solver_grid(), t, t_prev, power)
    expected = (seen["per_sample"] * weights).mean()
    torch.testing.assert_close(loss, expected.float())
    assert len(set(t.tolist())) > 1 and not torch.allclose(loss, seen["per_sample"].mean())
    with pytest.raises(StepdistillError, match="weighting must be 'uniform' or 'ict'"):
        ConsistencyDistillation(teacher, generator, weighting="edm")
    with pytest.raises(StepdistillError, match="weighting_power must be > 0"):
        ConsistencyDistillation(teacher, generator, weighting="ict", weighting_power=0)


def test_ict_pseudo_huber_is_on_each_samples_vector():
    """iCT's d(x, y) = sqrt(||x - y||^2 + c^2) - c, c = 0.00054 sqrt(d), over sqrt(d): a sample's whole
    error vector counts (not each element on its own, as LCM's "huber"), linear for large errors."""
    from stepdistill.losses import consistency_loss

    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1e-4, 0.0, 0.0, 0.0]]).view(2, 1, 2, 2)
    c = 0.00054 * 2  # d = 4
    expected = torch.tensor([((25 + c * c) ** 0.5 - c) / 2, ((1e-8 + c * c) ** 0.5 - c) / 2])
    torch.testing.assert_close(consistency_loss(pred, target, "huber_ict"), expected)
    per_element = consistency_loss(pred, target, "huber")
    assert float(per_element[0]) == pytest.approx((3 + 4) / 4, abs=1e-3)  # LCM's: the elements' own sum
    with pytest.raises(StepdistillError, match="'huber', 'huber_ict' or 'l2'"):
        ConsistencyDistillation(*lcm_parts(), loss="huber_vector")


def test_after_step_moves_the_target_by_ema_and_restarts_it_each_stage():
    teacher, generator = lcm_parts(solver_steps=8)
    algo = ConsistencyDistillation(teacher, generator, segments=[4, 2, 1], stage_steps=[3, 3], target_decay=0.9)
    before = [p.detach().clone() for p in algo.target.model.parameters()]
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    algo.after_step("generator", 0)
    for old, p_target, p in zip(before, algo.target.model.parameters(), generator.parameters(), strict=True):
        torch.testing.assert_close(p_target, 0.9 * old + 0.1 * p.detach())
    assert [algo.stage(s) for s in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    algo.after_step("generator", 2)  # the next step starts stage 1: the target restarts at the student
    for p_target, p in zip(algo.target.model.parameters(), generator.parameters(), strict=True):
        torch.testing.assert_close(p_target, p.detach())


def test_bad_settings_fail_with_one_line_errors():
    teacher, generator = lcm_parts()
    with pytest.raises(StepdistillError, match="guidance_embedding_dim"):
        ConsistencyDistillation(teacher, generator, guidance_min=2.0, guidance_max=6.0)
    with pytest.raises(StepdistillError, match="must divide generator.solver_steps=50"):
        ConsistencyDistillation(teacher, generator, segments=4)
    with pytest.raises(StepdistillError, match="stage_steps needs 2 entries"):
        ConsistencyDistillation(teacher, generator, segments=[5, 2, 1])
    with pytest.raises(StepdistillError, match="ConsistencyGenerator"):
        ConsistencyDistillation(teacher, tiny_parts()[1])
    with pytest.raises(StepdistillError, match="real samples"):
        ConsistencyDistillation(teacher, generator).loss("generator", labelled_batch(x0=False), 0)


def test_a_guided_student_gets_each_samples_scale():
    """With a scale range the student sees s through its embedding: a fresh one (zero projection)
    still equals the unguided student, and after the projection changes its output depends on s."""
    teacher, generator = lcm_parts(guidance_embedding_dim=16)
    proj = generator.denoiser.backbone.time_embedding.cond_proj.weight
    torch.nn.init.zeros_(proj)  # as built (lcm_parts perturbed every weight)
    algo = ConsistencyDistillation(teacher, generator, guidance_min=1.0, guidance_max=4.0, target_decay=0.0)
    batch = labelled_batch()
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5, dtype=torch.float64)
    same = [generator(x, t, batch.cond.with_guidance(s)) for s in (1.0, 4.0)]
    torch.testing.assert_close(same[0], same[1])
    torch.nn.init.normal_(proj)
    assert (generator(x, t, batch.cond.with_guidance(1.0)) - generator(x, t, batch.cond.with_guidance(4.0))).abs().max() > 1e-3
    scales = algo._draw_scale(1000, "cpu")
    assert 1.0 <= float(scales.min()) and float(scales.max()) <= 4.0 and float(scales.std()) > 0.5
    algo.loss("generator", batch, 0).loss.backward()
    assert proj.grad.abs().sum() > 0


def test_adversarial_term_reuses_the_dmd2_discriminator():
    """With a headed critic: phases alternate critic / generator; the critic phase is DMD2's
    discriminator loss (real vs the student's x0) and trains only the critic; the generator phase
    adds the weighted non-saturating GAN term to the consistency loss."""
    teacher, generator = lcm_parts(solver_steps=8)
    critic = tiny_parts()[2]
    algo = ConsistencyDistillation(teacher, generator, segments=[2, 1], stage_steps=[4], critic=critic,
                                   gan_generator_weight=0.5)
    assert algo.phases == ("critic", "generator") and [algo.phase(s) for s in range(3)] == ["critic", "generator", "critic"]
    batch = labelled_batch()
    generator.requires_grad_(False)
    out = algo.loss("critic", batch, 0)
    out.loss.backward()
    assert set(out.logs) == {"gan_critic_loss", "logit_real", "logit_fake"}
    assert all(p.grad is not None for p in critic.head.parameters())
    assert all(p.grad is None for p in generator.parameters())
    critic.zero_grad(set_to_none=True)
    generator.requires_grad_(True)
    critic.requires_grad_(False)
    torch.manual_seed(4)
    out = algo.loss("generator", batch, 1)
    torch.manual_seed(4)
    plain = ConsistencyDistillation(teacher, generator, segments=[2, 1], stage_steps=[4]).loss("generator", batch, 1)
    torch.testing.assert_close(out.loss, plain.loss + 0.5 * out.logs["gan_generator_loss"])
    with pytest.raises(StepdistillError, match="critic.head=true"):
        ConsistencyDistillation(teacher, generator, critic=type(critic)(teacher.denoiser, head=False))


def test_adversarial_noise_levels_stay_below_gan_t_max():
    """gan_t_max=0.25: the discriminator's real and student inputs are noised at table steps <= 250."""
    teacher, generator = lcm_parts(solver_steps=8)
    critic = tiny_parts()[2]
    algo = ConsistencyDistillation(teacher, generator, segments=[2, 1], stage_steps=[4], critic=critic,
                                   gan_t_max=0.25)
    seen = []
    critic.register_forward_hook(lambda _m, args, kwargs, _out: seen.append(args[1]) if kwargs.get("logits") else None,
                                 with_kwargs=True)
    torch.manual_seed(0)
    for step in range(6):
        algo.loss(algo.phase(step), labelled_batch(), step)
    assert len(seen) == 3 * 2 + 3  # two discriminator calls per critic phase, one per generator phase
    assert float(torch.cat(seen).max()) <= 250 / 999 + 1e-12
    with pytest.raises(StepdistillError, match="gan_t_max must be in"):
        ConsistencyDistillation(teacher, generator, critic=critic, gan_t_max=0.0)


@pytest.mark.parametrize("experiment,segments,sampler", [
    ("toy2d/lcm", [1], "renoise"), ("toy2d/mcd", [4], "ode"), ("digits/lcm", [1], "renoise"),
    ("digits/mcd", [8], "ode"), ("digits/tscd", [8, 4, 2, 1], "renoise"),
])
def test_shipped_consistency_experiments_build(experiment, segments, sampler):
    """The configs instantiate (lists arrive as omegaconf ListConfig) into the intended algorithm."""
    from stepdistill.config import compose
    from stepdistill.workflows.train import build_algorithm

    algo = build_algorithm(compose("train", [f"experiment={experiment}"]), seed=0)
    assert algo.segments == segments and algo.generator.sampler == sampler
    if len(segments) > 1:
        assert [algo.stage(s) for s in (0, 399, 400, 1199, 1200, 2999)] == [0, 0, 1, 2, 3, 3]
