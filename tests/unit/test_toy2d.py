"""toy2d: the Gaussian-mixture data, the ToyMLP denoiser and the toy metrics."""

import math

import pytest
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.toy2d import ToyConfigError, ToyMixture
from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
from stepdistill.eval.toy_metrics import (
    class_accuracy,
    mmd,
    mode_coverage,
    reference_metrics,
    swd,
    toy_metrics,
)
from stepdistill.schedules import NoiseSchedule, Prediction


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_freqs(ids: torch.Tensor, probs: torch.Tensor, n_sigma: float = 5.0) -> None:
    """Empirical frequencies of ``ids`` match ``probs`` within n_sigma binomial standard errors."""
    n = ids.numel()
    freq = torch.bincount(ids, minlength=probs.numel()).double() / n
    tol = n_sigma * (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= tol).all(), (freq, probs)


# ------------------------------------------------------------------------------------ mixture
def test_default_mixture_geometry_and_frequencies():
    m = ToyMixture()
    assert (m.modes, m.radius, m.std, m.classes) == (8, 2.0, 0.15, 4)
    assert torch.allclose(m.centers.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    assert torch.allclose(m.centers[0], torch.tensor([2.0, 0.0], dtype=torch.float64))
    assert m.mode_class.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # round robin
    assert torch.allclose(m.class_probs, torch.full((4,), 0.25, dtype=torch.float64))
    assert m.null_class == 4

    x, labels, mode_ids = m.sample(100_000, gen())
    assert x.shape == (100_000, 2) and x.dtype == torch.float32
    assert labels.dtype == mode_ids.dtype == torch.long
    assert torch.equal(labels, m.mode_class[mode_ids])
    assert_freqs(mode_ids, m.weights)
    assert_freqs(labels, m.class_probs)
    resid = x.double() - m.centers[mode_ids]
    assert resid.mean(0).abs().max() < 0.005
    assert torch.allclose(resid.std(0), torch.full((2,), 0.15, dtype=torch.float64), rtol=0.02)


def test_custom_weights_one_to_ten():
    w = [1, 10, 1, 10, 1, 10, 1, 10]
    m = ToyMixture(weights=w)
    expected = torch.tensor(w, dtype=torch.float64) / 44
    assert torch.allclose(m.weights, expected)
    # classes 1 and 3 own the heavy modes: p(class) = (10 + 10) / 44
    assert torch.allclose(m.class_probs, torch.tensor([2, 20, 2, 20], dtype=torch.float64) / 44)
    _, labels, mode_ids = m.sample(100_000, gen(1))
    assert_freqs(mode_ids, expected)
    assert_freqs(labels, m.class_probs)

    ramp = ToyMixture(weights=torch.linspace(1, 10, 8).tolist(), classes=3)
    _, _, ids = ramp.sample(100_000, gen(2))
    assert_freqs(ids, ramp.weights)


def test_sample_class_draws_the_class_conditional():
    m = ToyMixture(weights=[1, 2, 3, 4, 5, 6, 7, 8], classes=4)
    labels = torch.full((50_000,), 2)
    x, ids = m.sample_class_with_modes(labels, gen())
    assert set(ids.unique().tolist()) == {2, 6}
    assert_freqs(ids, m.mode_given_class[2])  # p(mode 2 | class 2) = 3 / 10, mode 6: 7 / 10
    assert torch.allclose(m.mode_given_class[2, [2, 6]], torch.tensor([0.3, 0.7], dtype=torch.float64))
    assert torch.equal(m.nearest_mode(x), ids)  # modes are > 10 stds apart

    mixed = torch.tensor([0, 1, 2, 3] * 500)
    ids = m.sample_class_with_modes(mixed, gen(1))[1]
    assert torch.equal(m.mode_class[ids], mixed)
    with pytest.raises(ValueError, match="0..3"):
        m.sample_class(torch.tensor([0, 4]))  # the null class is not a class of the data


@pytest.mark.parametrize("kwargs", [
    dict(modes=3, radius=5.0, std=0.5, classes=3),
    dict(modes=5, radius=0.7, std=0.05, classes=2, weights=[5, 1, 1, 1, 1]),
    dict(modes=1, radius=0.0, std=1.0, classes=1),
    dict(modes=12, radius=3.0, std=0.1, classes=1),
])
def test_any_configuration_works(kwargs):
    m = ToyMixture(**kwargs)
    assert m.centers.shape == (m.modes, 2)
    assert torch.allclose(m.centers.norm(dim=1), torch.full((m.modes,), m.radius, dtype=torch.float64))
    x, labels, ids = m.sample(60_000, gen())
    assert torch.equal(labels, ids % m.classes)
    assert_freqs(ids, m.weights)
    resid = x.double() - m.centers[ids]
    assert torch.allclose(resid.std(0), torch.full((2,), m.std, dtype=torch.float64), rtol=0.03)
    assert torch.allclose(m.mode_given_class.sum(1), torch.ones(m.classes, dtype=torch.float64))
    if m.classes == 1:
        assert (labels == 0).all()


def test_sampling_is_deterministic():
    a, b = ToyMixture(seed=3), ToyMixture(seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a.sample(100), b.sample(100), strict=True))
    assert not torch.equal(a.sample(100)[0], a.sample(100)[0])  # the own generator advances
    assert torch.equal(a.sample(100, gen(7))[0], b.sample(100, gen(7))[0])
    labels = torch.tensor([0, 1, 2, 3, 3])
    assert torch.equal(a.sample_class(labels, gen(7)), b.sample_class(labels, gen(7)))


def test_log_prob_is_a_normalised_density():
    m = ToyMixture(modes=3, radius=1.0, std=0.4, classes=2, weights=[1, 2, 3])
    grid = torch.linspace(-4, 4, 321, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    cell = (grid[1] - grid[0]) ** 2
    assert float(m.log_prob(pts).exp().sum() * cell) == pytest.approx(1.0, abs=1e-4)
    for c in range(2):
        labels = torch.full((pts.shape[0],), c)
        assert float(m.log_prob(pts, labels).exp().sum() * cell) == pytest.approx(1.0, abs=1e-4)
    # p(x) = sum_c p(c) p(x | c)
    x = torch.randn(7, 2, dtype=torch.float64)
    joint = sum(m.class_probs[c] * m.log_prob(x, torch.full((7,), c)).exp() for c in range(2))
    assert torch.allclose(joint, m.log_prob(x).exp())


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=[1, 2, 3]), "data.weights has 3 entries but data.modes is 8"),
    (dict(modes=2, weights=[1, -1], classes=2), "data.weights must be positive.*entry 1"),
    (dict(modes=2, weights=[1, 0], classes=2), "data.weights must be positive.*entry 1"),
    (dict(modes=2, weights=[1, float("nan")], classes=2), "data.weights must be positive"),
    (dict(modes=2, weights="12", classes=2), "data.weights must be a list"),
    (dict(modes=3, classes=4), "data.classes is 4 but data.modes is 3"),
    (dict(modes=0, classes=1), "data.modes must be >= 1"),
    (dict(modes=2.5), "data.modes must be an integer"),
    (dict(classes=0), "data.classes must be >= 1"),
    (dict(std=0.0), "data.std must be > 0"),
    (dict(radius=-1.0), "data.radius must be > 0"),
    (dict(radius=float("inf")), "data.radius must be finite"),
])
def test_bad_configuration_raises_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        ToyMixture(**kwargs)
    assert isinstance(info.value, ToyConfigError)


# ------------------------------------------------------------------------------------ ToyMLP
def small_mlp(**kw) -> ToyMLP:
    return ToyMLP(**{"num_classes": 4, "hidden": 32, "layers": 2, "time_embed_dim": 16, **kw})


def test_toy_mlp_round_trips_through_save_pretrained(tmp_path):
    model = small_mlp().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ToyMLP.from_pretrained(tmp_path).eval()
    assert {k: v for k, v in loaded.config.items() if not k.startswith('_')} == \
        {k: v for k, v in model.config.items() if not k.startswith('_')}
    assert loaded.class_embedding.num_embeddings == 5  # 4 classes + the null class
    x, t = torch.randn(6, 2), torch.rand(6) * 1000
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        assert torch.equal(model(x, t, labels).sample, loaded(x, t, labels).sample)
        assert torch.equal(model(x, t).sample, loaded(x, t).sample)


def test_toy_mlp_conditioning_and_shapes():
    model = small_mlp(data_dim=3)
    x, t = torch.randn(4, 3), torch.full((4,), 250.0)
    out = model(x, t, torch.tensor([0, 1, 2, 3]))
    assert out.sample.shape == (4, 3)
    null = model(x, t, torch.full((4,), 4)).sample
    assert torch.equal(model(x, t).sample, null)  # None = the null class
    assert torch.equal(model(x, 250.0).sample, null)  # a scalar timestep is broadcast
    assert not torch.allclose(out.sample, null)
    assert not torch.allclose(model(x, t + 100).sample, null)  # the timestep matters
    assert model(x, t, return_dict=False)[0].shape == (4, 3)
    out.sample.square().sum().backward()
    assert model.class_embedding.weight.grad is not None
    with pytest.raises(ValueError, match="layers=0"):
        ToyMLP(layers=0)


def test_toy_denoiser_x0_matches_hand_conversion_flow():
    model = small_mlp().eval()
    den = ToyDenoiser(model, NoiseSchedule.flow(), Prediction.FLOW)
    x_t, t = torch.randn(5, 2), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    cond = Conditioning.labels(torch.tensor([0, 1, 2, 3, 4]), null_class=4)
    with torch.no_grad():
        v = model(x_t, (t * 1000).float(), cond.class_labels).sample  # SD3-style 0..1000 timestep
        assert torch.equal(den.raw(x_t, t, cond), v)
        x0 = den(x_t, t, cond)
    assert torch.allclose(x0.double(), x_t.double() - t[:, None] * v.double(), atol=1e-6)
    assert den.default_feature_modules == ("blocks.1",)
    feats = den.features(x_t, t, cond)
    assert feats["blocks.1"].shape == (5, 32)


def test_toy_denoiser_x0_matches_hand_conversion_vp():
    model = small_mlp().eval()
    schedule = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    den = ToyDenoiser(model, schedule, Prediction.EPS)
    steps = torch.tensor([0, 10, 500, 900, 999])
    t = steps.double() / 999  # integer backbone timesteps, so the table is read exactly
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    alpha, sigma = alphas_cumprod[steps].sqrt(), (1 - alphas_cumprod[steps]).sqrt()
    x_t = torch.randn(5, 2)
    cond = Conditioning.labels(torch.tensor([3, 2, 1, 0, 4]), null_class=4)
    with torch.no_grad():
        eps = model(x_t, steps.float(), cond.class_labels).sample
        assert torch.allclose(den.raw(x_t, t, cond), eps, atol=1e-5)
        x0 = den(x_t, t, cond)
    expected = (x_t.double() - sigma[:, None] * eps.double()) / alpha[:, None]
    assert torch.allclose(x0.double(), expected, rtol=1e-4, atol=1e-4)


def test_load_denoiser_finds_the_toy_adapter(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.denoisers.loading import load_denoiser

    model = small_mlp().eval()
    model.save_pretrained(tmp_path / "denoiser")
    FlowMatchEulerDiscreteScheduler().save_pretrained(tmp_path / "scheduler")
    den = load_denoiser(tmp_path)
    assert isinstance(den, ToyDenoiser) and den.schedule.kind == "flow"
    x_t, cond = torch.randn(3, 2), Conditioning.labels(torch.tensor([0, 1, 4]), 4)
    with torch.no_grad():
        assert torch.allclose(den(x_t, 0.5, cond), ToyDenoiser(model, NoiseSchedule.flow(), Prediction.FLOW)(x_t, 0.5, cond))


# ------------------------------------------------------------------------------------ metrics
def test_swd_and_mmd_of_a_set_with_itself_are_zero():
    x = ToyMixture().sample(1000, gen())[0]
    assert swd(x, x, generator=gen()) == 0.0
    assert mmd(x, x, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    # unbiased: x vs x equals 2 (mean off-diagonal k - 1) / n, a little below 0
    assert -2 / 1000 < mmd(x, x) < 0


def test_swd_of_a_shift_is_norm_over_sqrt2():
    # Analytically: along theta = (cos a, sin a), x + s projects to a shift of s . theta, so the 1-D
    # W2^2 is (s . theta)^2 = |s|^2 cos^2(a - phi); its mean over uniform a is |s|^2 / 2.
    grid = torch.linspace(0, 2 * math.pi, 100_001, dtype=torch.float64)[:-1]
    assert float(grid.cos().pow(2).mean()) == pytest.approx(0.5, abs=1e-12)
    x = ToyMixture().sample(200, gen())[0]
    for s in ([0.3, 0.0], [0.0, -1.0], [2.0, 1.5]):
        shift = torch.tensor(s)
        value = swd(x, x + shift, projections=4096, generator=gen(1))
        assert value == pytest.approx(float(shift.norm()) / math.sqrt(2), rel=0.02)


def test_swd_and_mmd_grow_with_the_shift():
    m = ToyMixture()
    x = m.sample(500, gen())[0]
    y = m.sample(500, gen(1))[0]
    shifts = [0.0, 0.1, 0.2, 0.4, 0.8]
    swds = [swd(x, y + d, generator=gen(2)) for d in shifts]
    mmds = [mmd(x, y + d) for d in shifts]
    assert swds == sorted(swds) and mmds == sorted(mmds)
    assert swds[-1] > 3 * swds[0] and mmds[-1] > 30 * abs(mmds[0])
    with pytest.raises(ValueError, match="equal-size"):
        swd(x, y[:10])


def test_mmd_matches_a_direct_computation():
    x, y = torch.randn(300, 2, dtype=torch.float64), torch.randn(250, 2, dtype=torch.float64) + 0.3
    h = torch.tensor([0.2, 1.0], dtype=torch.float64)

    def k(a, b):
        return torch.exp(-torch.cdist(a, b).pow(2)[None] / (2 * h[:, None, None] ** 2)).mean(0)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    unbiased = ((kxx.sum() - 300) / (300 * 299) + (kyy.sum() - 250) / (250 * 249) - 2 * kxy.mean())
    assert mmd(x, y, (0.2, 1.0), unbiased=False) == pytest.approx(float(biased), rel=1e-9)
    assert mmd(x, y, (0.2, 1.0)) == pytest.approx(float(unbiased), rel=1e-9)


def test_mode_coverage():
    m = ToyMixture()
    x, labels, ids = m.sample(4000, gen())
    assert mode_coverage(x, m) == 1.0
    assert mode_coverage(x, m, labels) == 1.0
    half = m.sample(8000, gen(1))
    keep = half[2] < 4  # samples from modes 0..3 only (each gets twice its expected mass)
    assert mode_coverage(half[0][keep], m) == 0.5
    assert mode_coverage(x + 10.0, m) == 0.0  # > 4 stds from every center: no mode
    # a mode with 40% of its expected mass is not covered
    drop = (ids == 5) & (torch.rand(4000, generator=gen(3)) < 0.6)
    assert mode_coverage(x[~drop], m) == 7 / 8


def test_class_accuracy():
    m = ToyMixture()
    x, labels, _ = m.sample(4000, gen())
    assert class_accuracy(x, labels, m) == 1.0
    random_labels = torch.randint(0, 4, (4000,), generator=gen(1))
    assert class_accuracy(x, random_labels, m) == pytest.approx(0.25, abs=0.03)
    three = ToyMixture(modes=6, classes=3)
    x3, _, _ = three.sample(3000, gen(2))
    assert class_accuracy(x3, torch.randint(0, 3, (3000,), generator=gen(3)), three) == pytest.approx(1 / 3, abs=0.04)
    bad = x.clone()
    bad[:400] = float("nan")  # non-finite samples count as wrong
    assert class_accuracy(bad, labels, m) == pytest.approx(0.9)


def test_toy_metrics_against_a_same_label_reference():
    m = ToyMixture()
    x, labels, _ = m.sample(1000, gen())
    a = toy_metrics(x, labels, m, gen(5))
    assert set(a) == {"swd", "mmd", "mode_coverage", "class_accuracy"}
    assert a == toy_metrics(x, labels, m, gen(5))  # deterministic given the generator
    assert a["mode_coverage"] == 1.0 and a["class_accuracy"] == 1.0
    worse = toy_metrics(x + torch.tensor([0.4, 0.0]), labels, m, gen(5))
    assert worse["swd"] > 2 * a["swd"] and worse["mmd"] > 0.01 > abs(a["mmd"])
    collapsed = toy_metrics(m.centers[m.mode_class[:0].new_zeros(1000)].float(), labels, m, gen(5))
    assert collapsed["mode_coverage"] == 1 / 8 and collapsed["class_accuracy"] == pytest.approx(0.25, abs=0.05)


def test_reference_metrics_at_4000():
    # measured: swd 0.080 and mmd -7.9e-05 (generator seed 0); swd is 0.04..0.10 across seeds
    ref = reference_metrics(ToyMixture(), 4000, generator=gen(0))
    assert ref["swd"] < 0.15
    assert abs(ref["mmd"]) < 1e-3
    assert ref["mode_coverage"] == 1.0 and ref["class_accuracy"] == 1.0
