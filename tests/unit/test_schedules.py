"""NoiseSchedule: conversions, add_noise against diffusers, from_diffusers, grids, derivatives."""

import diffusers
import pytest
import torch

from stepdistill.schedules import NoiseSchedule, Prediction

VP_SCHEDULES = {
    "sd15_eps": lambda: NoiseSchedule.vp("scaled_linear", prediction=Prediction.EPS),
    "ddpm_v": lambda: NoiseSchedule.vp("linear", 1000, 1e-4, 0.02, Prediction.V),
    "cosine": lambda: NoiseSchedule.vp("squaredcos_cap_v2"),
}
ALL = {**VP_SCHEDULES, "flow": lambda: NoiseSchedule.flow(), "flow_shift3": lambda: NoiseSchedule.flow(3.0)}


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("src", list(Prediction))
@pytest.mark.parametrize("dst", list(Prediction))
def test_convert_round_trips_in_float64(name, src, dst):
    s = ALL[name]()
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.96 + 0.02
    there = s.convert(pred, x_t, t, src, dst)
    back = s.convert(there, x_t, t, dst, src)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(ALL))
def test_conversions_agree_with_the_forward_process(name):
    """From the true (x0, eps), every parameterization converts back to the true x0."""
    s = ALL[name]()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 2, generator=g, dtype=torch.float64)
    t = torch.rand(8, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = s.add_noise(x0, eps, t)
    for p in Prediction:
        target = s.target(x0, eps, t, p)
        torch.testing.assert_close(s.to_x0(target, x_t, t, p), x0, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(s.from_x0(x0, x_t, t, p), target, rtol=1e-8, atol=1e-8)


def test_flow_conventions():
    s = NoiseSchedule.flow()
    x0, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0.1, 0.3, 0.6, 0.9])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * eps)
    torch.testing.assert_close(s.target(x0, eps, t, Prediction.FLOW), eps - x0)
    v = eps - x0
    torch.testing.assert_close(s.convert(v, x_t, t, Prediction.FLOW, Prediction.X0), x_t - t[:, None] * v)
    torch.testing.assert_close(s.to_model_time(t), t.double() * 1000)


@pytest.mark.parametrize("name", list(VP_SCHEDULES))
def test_derivatives_match_finite_differences(name):
    s = VP_SCHEDULES[name]()
    t = torch.tensor([0.1234, 0.4567, 0.789], dtype=torch.float64)
    h = 1e-7
    torch.testing.assert_close(s.d_alpha(t), (s.alpha(t + h) - s.alpha(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.d_sigma(t), (s.sigma(t + h) - s.sigma(t - h)) / (2 * h), rtol=1e-5, atol=1e-6)


SCHEDULERS = [diffusers.DDPMScheduler, diffusers.DDIMScheduler, diffusers.LCMScheduler]


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize("betas", ["scaled_linear", "linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_from_diffusers_reproduces_alphas_and_add_noise(cls, betas, prediction_type):
    sch = cls(beta_schedule=betas, beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    s = NoiseSchedule.from_diffusers(sch)
    assert s.prediction == Prediction.from_diffusers(prediction_type)
    torch.testing.assert_close(s.alphas_cumprod, sch.alphas_cumprod.double(), rtol=0, atol=1e-7)
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    steps = torch.tensor([0, 1, 250, 777, 999])
    ours = s.add_noise(x0, eps, s.from_model_time(steps))
    torch.testing.assert_close(ours, sch.add_noise(x0, eps, steps), rtol=1e-5, atol=1e-5)


def test_from_diffusers_config_dict_and_zero_snr():
    sch = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    from_obj = NoiseSchedule.from_diffusers(sch)
    from_cfg = NoiseSchedule.from_diffusers(dict(sch.config, _class_name="DDIMScheduler"))
    torch.testing.assert_close(from_obj.alphas_cumprod, from_cfg.alphas_cumprod, rtol=1e-6, atol=1e-9)
    assert float(from_obj.alpha(torch.tensor(1.0))) < 1e-3


def test_euler_discrete_matches_in_vp_scaling():
    """EulerDiscreteScheduler noises in the VE form x0 + sigma eps; ours is the same scaled by alpha."""
    sch = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s = NoiseSchedule.from_diffusers(sch)
    sch.set_timesteps(10)
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    ts = sch.timesteps[[0, 4, 9]]
    t = s.from_model_time(ts)
    ve = sch.add_noise(x0, eps, ts)
    torch.testing.assert_close(s.add_noise(x0, eps, t), (s.alpha(t)[:, None] * ve).float(), rtol=1e-4, atol=1e-4)


def test_flow_from_diffusers_and_shifted_grid():
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    s = NoiseSchedule.from_diffusers(sch)
    assert (s.kind, s.shift, s.prediction) == ("flow", 3.0, Prediction.FLOW)
    grid = s.timesteps(4)
    u = torch.linspace(1, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(grid, 3 * u / (1 + 2 * u))
    x0, eps = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sig = torch.tensor([0.75, 0.3])
    plain = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)  # set_timesteps would shift sigmas
    for i, sigma in enumerate(sig):
        plain.set_timesteps(sigmas=[float(sigma), 0.1])
        ref = plain.scale_noise(x0[i:i + 1], plain.timesteps[:1], eps[i:i + 1])
        torch.testing.assert_close(s.add_noise(x0[i:i + 1], eps[i:i + 1], sigma), ref)


def test_vp_grid_is_diffusers_trailing_spacing():
    s = NoiseSchedule.vp()
    for n in (1, 2, 4, 8, 50):
        sch = diffusers.DDIMScheduler(timestep_spacing="trailing")
        sch.set_timesteps(n)
        grid = s.timesteps(n)
        assert grid[-1] == 0 and len(grid) == n + 1
        torch.testing.assert_close(s.to_model_time(grid[:-1]).round().long(), sch.timesteps.long())


def test_late_start_grid_is_trailing_spacing_on_the_table_below_t_max():
    """t_max < 1: the grid is on the integer table, from T0 = round(t_max * 999) (DDPM trailing spacing
    over the first T0 + 1 steps), so diffusers' schedulers can run it; flow grids scale by t_max."""
    s = NoiseSchedule.vp()
    model = s.to_model_time(s.timesteps(4, t_max=0.7)).tolist()
    assert [round(v, 9) for v in model] == [699, 524, 349, 174, 0]
    assert s.to_model_time(s.timesteps(1, t_max=0.625))[0].item() == pytest.approx(624)
    flow = NoiseSchedule.flow(shift=3.0)
    torch.testing.assert_close(flow.timesteps(4, t_max=0.5), flow.timesteps(4) * 0.5)
    with pytest.raises(ValueError, match="t_max must be in"):
        s.timesteps(2, t_max=0.0)
    with pytest.raises(ValueError, match="do not fit below timestep"):
        s.timesteps(8, t_max=0.005)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="beta schedule"):
        NoiseSchedule.vp("cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        Prediction.from_diffusers("score")
    with pytest.raises(ValueError, match="steps"):
        NoiseSchedule.flow().timesteps(0)


def test_t_from_sigma_ratio_inverts_sigma_over_alpha():
    """EDM's sigma of a schedule is sigma(t) / alpha(t): flow t / (1 - t); VP sqrt((1 - ab) / ab) at the
    table's own steps (ab from the betas, computed here), with values beyond the table clamped."""
    flow = NoiseSchedule.flow()
    torch.testing.assert_close(flow.t_from_sigma_ratio(torch.tensor([1.0, 3.0, 0.25])),
                               torch.tensor([0.5, 0.75, 0.2], dtype=torch.float64))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    steps = torch.tensor([0, 1, 20, 500, 979, 999])
    ratio = ((1 - ab[steps]) / ab[steps]).sqrt()
    vp = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    torch.testing.assert_close(vp.t_from_sigma_ratio(ratio), steps.double() / 999, rtol=0, atol=1e-9)
    t = vp.t_from_sigma_ratio(torch.tensor([0.5, 2.0]))  # between table steps: the same interpolation as alpha
    torch.testing.assert_close(vp.sigma(t) / vp.alpha(t), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert vp.t_from_sigma_ratio(torch.tensor([1e-4, 1e4])).tolist() == [0.0, 1.0]
