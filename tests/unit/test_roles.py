"""Teacher / Generator / Critic, CFG, and the samplers, on a tiny class-conditional UNet2DModel."""

import diffusers
import pytest
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.diffusers import UNet2DDenoiser
from stepdistill.guidance import cfg
from stepdistill.roles import Critic, Generator, Teacher
from stepdistill.schedules import NoiseSchedule, Prediction
from stepdistill.teachers import build_digits_unet


@pytest.fixture(scope="module")
def denoiser():
    torch.manual_seed(0)
    unet = build_digits_unet((8, 16), 1, num_classes=3, norm_groups=4)
    return UNet2DDenoiser(unet, NoiseSchedule.vp("linear", 1000, 1e-4, 0.02), Prediction.EPS)


def batch(b=4):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(b, 1, 8, 8, generator=g), torch.rand(b, generator=g) * 0.9 + 0.05,
            Conditioning.labels(torch.tensor([0, 1, 2, 1][:b]), null_class=3))


def test_unet2d_x0_equals_hand_conversion(denoiser):
    x_t, t, cond = batch()
    eps = denoiser.backbone(x_t, t * 999, class_labels=cond.class_labels).sample.double()
    ab = denoiser.schedule.alpha(t) ** 2
    x0 = (x_t.double() - (1 - ab).sqrt()[:, None, None, None] * eps) / ab.sqrt()[:, None, None, None]
    torch.testing.assert_close(denoiser(x_t, t, cond).double(), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoiser(x_t, t, cond, out=Prediction.EPS).double(), eps, rtol=1e-4, atol=1e-5)


def test_teacher_cfg(denoiser):
    teacher = Teacher(denoiser, guidance_scale=1.0)
    x_t, t, cond = batch()
    c, u = denoiser(x_t, t, cond), denoiser(x_t, t, cond.null())
    torch.testing.assert_close(teacher.predict(x_t, t, cond), c)
    torch.testing.assert_close(teacher.predict(x_t, t, cond, guidance_scale=3.0), u + 3.0 * (c - u),
                               rtol=1e-4, atol=1e-4)
    per_sample = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(teacher.predict(x_t, t, cond, guidance_scale=per_sample), cfg(u, c, per_sample),
                               rtol=1e-4, atol=1e-4)
    # guidance in x0 space equals guidance in eps space
    ge = teacher.predict(x_t, t, cond, guidance_scale=3.0, out=Prediction.EPS)
    gx = teacher.predict(x_t, t, cond, guidance_scale=3.0)
    torch.testing.assert_close(denoiser.schedule.convert(ge, x_t, t, "eps", "x0"), gx, rtol=1e-4, atol=1e-4)
    assert teacher.nfe(50, 2.0) == 100 and teacher.nfe(50, 1.0) == 50


def test_teacher_is_frozen_and_stays_in_eval(denoiser):
    teacher = Teacher(denoiser)
    teacher.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_generator_and_critic_are_trainable_copies(denoiser):
    teacher = Teacher(denoiser)
    gen, critic = Generator(teacher.denoiser, steps=4), Critic(teacher.denoiser)
    assert all(p.requires_grad for p in gen.trainable_parameters())
    x_t, t, cond = batch()
    gen(x_t, t, cond).sum().backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert gen.denoiser.backbone is not teacher.denoiser.backbone
    torch.testing.assert_close(critic(x_t, t, cond), teacher.predict(x_t, t, cond))
    torch.testing.assert_close(gen.grid() * 999, torch.tensor([999.0, 749, 499, 249], dtype=torch.float64))
    feats = critic.features(x_t, t, cond)
    assert feats["mid_block"].shape == (4, 16, 4, 4)


def test_generator_sample_is_reproducible_and_one_step_is_one_call(denoiser):
    gen = Generator(denoiser, steps=1)
    noise = torch.randn(4, 1, 8, 8)
    _, _, cond = batch()
    one = gen.sample(noise, cond)
    torch.testing.assert_close(one, gen(noise, torch.ones(4), cond))
    a = gen.sample(noise, cond, steps=3, generator=torch.Generator().manual_seed(0))
    b = gen.sample(noise, cond, steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_ode_sampler_equals_diffusers_ddim_loop(denoiser):
    """Our DDIM sampler == diffusers' DDIMScheduler (trailing spacing, set_alpha_to_one) loop."""
    sch = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    teacher = Teacher(denoiser, guidance_scale=2.0)
    _, _, cond = batch()
    noise = torch.randn(4, 1, 8, 8)
    ours = teacher.sample(noise, cond, steps=5)
    sch.set_timesteps(5)
    x = noise.clone()
    unet = denoiser.backbone
    with torch.no_grad():
        for ts in sch.timesteps:
            e = unet(torch.cat([x, x]), ts, class_labels=torch.cat([cond.class_labels, cond.null().class_labels])).sample
            e = e[4:] + 2.0 * (e[:4] - e[4:])
            x = sch.step(e, ts, x).prev_sample
        # diffusers' last step lands at alpha_bar = 1, i.e. returns its x0 prediction
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_generator_timesteps_set_its_own_grid_and_survive_settings(denoiser):
    """``timesteps`` (DMD2's denoising_step_list) is the K-step grid; other step counts keep the even
    grid from t_max; the settings rebuild the same sampler."""
    from stepdistill.pipelines.runs import build_generator
    from stepdistill.sampling import renoise_sample

    gen = Generator(denoiser, steps=4, t_max=0.3, timesteps=[300, 150, 100, 50], copy=False)
    assert gen.schedule.to_model_time(gen.grid()).tolist() == [300.0, 150.0, 100.0, 50.0]
    assert gen.schedule.to_model_time(gen.grid(2)).tolist() == [300.0, 149.0]  # the even (trailing) grids
    assert gen.schedule.to_model_time(gen.grid(3)).tolist() == [300.0, 200.0, 99.0]
    rebuilt = build_generator(gen.settings(), denoiser)
    assert gen.settings()["timesteps"] == [300.0, 150.0, 100.0, 50.0] and torch.equal(rebuilt.grid(), gen.grid())
    assert "timesteps" not in Generator(denoiser, steps=4, copy=False).settings()
    noise, (_, _, cond) = torch.randn(4, 1, 8, 8), batch()
    by_hand = renoise_sample(lambda x, t: gen(x, t, cond), gen.schedule, noise,
                             torch.tensor([300, 150, 100, 50], dtype=torch.float64) / 999,
                             generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gen.sample(noise, cond, generator=torch.Generator().manual_seed(1)), by_hand)


def test_training_timesteps_set_the_training_grid_only(denoiser):
    """``training_timesteps``: backward simulation's grid; sampling and the settings keep ``timesteps``."""
    gen = Generator(denoiser, steps=4, t_max=0.3, timesteps=[300, 100, 50, 20],
                    training_timesteps=[300, 150, 100, 50], copy=False)
    assert gen.schedule.to_model_time(gen.training_grid()).tolist() == [300.0, 150.0, 100.0, 50.0]
    assert gen.schedule.to_model_time(gen.grid()).tolist() == [300.0, 100.0, 50.0, 20.0]
    assert gen.settings()["timesteps"] == [300.0, 100.0, 50.0, 20.0] and "training_timesteps" not in gen.settings()
    plain = Generator(denoiser, steps=4, t_max=0.3, timesteps=[300, 100, 50, 20], copy=False)
    assert torch.equal(plain.training_grid(), plain.grid())
    with pytest.raises(ValueError, match=r"^generator.training_timesteps=\[300.0, 150.0\] has 2 values") as err:
        Generator(denoiser, steps=4, t_max=0.3, training_timesteps=[300, 150], copy=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("timesteps,problem", [([300, 150, 100], "has 3 values for generator.steps=4"),
                                               ([300, 150, 150, 50], "strictly descending"),
                                               ([300, 150, 100, 0], "above 0"),
                                               ([300, 150.5, 100, 50], "integer timesteps"),
                                               ([999, 150, 100, 50], "starts at 999, but generator.t_max=0.3")])
def test_bad_generator_timesteps_are_one_line_errors(denoiser, timesteps, problem):
    with pytest.raises(ValueError, match=problem) as err:
        Generator(denoiser, steps=4, t_max=0.3, timesteps=timesteps, copy=False)
    assert "\n" not in str(err.value)
