"""Digits data, the shipped digits classifier, and the digits FID / class accuracy."""

import json
import shutil
from itertools import pairwise

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from stepdistill.data.digits import (
    DigitsData,
    load_digits_tensors,
    split,
    to_uint8,
    to_unit,
)
from stepdistill.errors import StepdistillError
from stepdistill.eval.digits_classifier import (
    DEFAULT_DIR,
    DigitsClassifier,
    DigitsFeatures,
    accuracy,
    default_classifier,
    load_classifier,
    save_classifier,
)
from stepdistill.eval.digits_fid import (
    class_accuracy,
    digits_features,
    digits_fid,
    digits_metrics,
)
from stepdistill.eval.fid_stats import frechet_distance


def _noisy(images, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return images + std * torch.randn(images.shape, generator=g)


def _scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


# ---------------------------------------------------------------- data


def test_digits_tensors_shapes_range_and_labels():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert images.min() == -1.0 and images.max() == 1.0
    # pixel values 0..16 map to multiples of 1/8 in [-1, 1]
    assert torch.equal(images * 8, (images * 8).round())
    counts = torch.bincount(labels, minlength=10)
    assert counts.tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    images[0] = 5.0  # callers get copies
    assert load_digits_tensors()[0].max() == 1.0


def test_split_is_deterministic_stratified_and_disjoint():
    train, test = split(seed=0, test_fraction=0.2)
    train2, test2 = split(seed=0, test_fraction=0.2)
    assert torch.equal(train, train2) and torch.equal(test, test2)
    assert not torch.equal(test, split(seed=1)[1])
    assert len(set(train.tolist()) & set(test.tolist())) == 0
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    _, labels = load_digits_tensors()
    frac = torch.bincount(labels[test], minlength=10) / torch.bincount(labels, minlength=10)
    assert torch.all((frac - 0.2).abs() < 0.01)


def test_unit_and_uint8_helpers():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert torch.allclose(to_unit(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    u8 = to_uint8(x)
    assert u8.dtype == torch.uint8 and u8.tolist() == [0, 0, 128, 255, 255]


def test_digits_data_sample_is_seeded():
    data = DigitsData("train")
    assert len(data) == 1438 and len(DigitsData("test")) == 359 and len(DigitsData()) == 1797
    x, y = data.sample(16, torch.Generator().manual_seed(3))
    x2, y2 = data.sample(16, torch.Generator().manual_seed(3))
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError):
        DigitsData("validation")


# ---------------------------------------------------------------- classifier


def test_shipped_classifier_is_small_and_accurate():
    assert sum(p.stat().st_size for p in DEFAULT_DIR.iterdir()) < 1_000_000
    model = load_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images, labels = load_digits_tensors()
    _, test = split()
    acc = accuracy(model, images[test], labels[test])
    assert acc >= 0.97
    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    assert acc == pytest.approx(config["held_out_accuracy"], abs=1e-4)
    assert model.features(images[:5]).shape == (5, 64)
    assert model(images[:5]).shape == (5, 10)


def test_save_load_round_trip(tmp_path):
    model = DigitsClassifier(channels=(4, 8, 8), hidden=16, feature_dim=12)
    save_classifier(model, tmp_path)
    loaded = load_classifier(tmp_path)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(model(x), loaded(x))
    assert loaded.features(x).shape == (3, 12)


@pytest.mark.parametrize(
    "file, content",
    [
        ("model.safetensors", b"this is not a safetensors file"),
        ("config.json", b"{not json"),
        ("config.json", b'{"channels": [32, 64, 64]}'),
        ("model.safetensors", None),  # missing
    ],
)
def test_corrupt_or_missing_classifier_file_raises(tmp_path, file, content):
    target = tmp_path / "clf"
    shutil.copytree(DEFAULT_DIR, target)
    if content is None:
        (target / file).unlink()
    else:
        (target / file).write_bytes(content)
    with pytest.raises(StepdistillError) as info:
        load_classifier(target)
    message = str(info.value)
    assert "\n" not in message and str(target / file) in message
    assert "python -m stepdistill.eval.digits_classifier" in message


def test_wrong_weights_raise(tmp_path):
    target = tmp_path / "clf"
    shutil.copytree(DEFAULT_DIR, target)
    save_file({"head.weight": torch.zeros(3, 3)}, str(target / "model.safetensors"))
    with pytest.raises(StepdistillError, match="model.safetensors"):
        load_classifier(target)


# ---------------------------------------------------------------- FID and class accuracy


def test_feature_module_meets_torchmetrics_contract():
    module = DigitsFeatures(default_classifier())
    assert module.num_features == 64
    out = module(torch.rand(4, 1, 8, 8))
    assert out.shape == (4, 64) and out.dtype == torch.float64
    u8 = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.allclose(module(u8), module(u8.float() / 255))


def test_fid_of_real_set_against_itself_is_zero():
    images, _ = load_digits_tensors()
    # torchmetrics gives ~1e-12 here (float64 round-off in eigvals of sigma @ sigma)
    assert abs(digits_fid(images)) < 1e-6


def test_torchmetrics_fid_matches_scipy_and_own_frechet_distance():
    images, _ = load_digits_tensors()
    noisy = _noisy(images, 0.3)
    fid = digits_fid(noisy)
    real_f, fake_f = digits_features(images).numpy(), digits_features(noisy).numpy()
    reference = _scipy_fid(real_f, fake_f)
    assert fid > 1.0
    assert fid == pytest.approx(reference, rel=1e-3)
    own = frechet_distance(
        real_f.mean(0), np.cov(real_f, rowvar=False), fake_f.mean(0), np.cov(fake_f, rowvar=False)
    )
    assert own == pytest.approx(reference, rel=1e-6)


def test_fid_with_custom_real_set_and_cache():
    images, _ = load_digits_tensors()
    train, test = split()
    fid = digits_fid(images[test], real=images[train])
    reference = _scipy_fid(
        digits_features(images[train]).numpy(), digits_features(images[test]).numpy()
    )
    assert fid == pytest.approx(reference, rel=1e-3)
    # repeated calls reuse the cached real statistics and give the same value
    assert digits_fid(images[test], real=images[train]) == pytest.approx(fid, rel=1e-12)


def test_fid_increases_with_noise():
    images, _ = load_digits_tensors()
    fids = [digits_fid(_noisy(images, std)) for std in (0.0, 0.05, 0.1, 0.3, 0.5, 1.0)]
    assert all(a < b for a, b in pairwise(fids)), fids


def test_class_accuracy_and_metrics():
    images, labels = load_digits_tensors()
    assert class_accuracy(images, labels) >= 0.97
    assert class_accuracy(images, (labels + 1) % 10) < 0.05
    metrics = digits_metrics(images[:400], labels[:400])
    assert set(metrics) == {"fid", "class_accuracy"}
    assert metrics["class_accuracy"] >= 0.97 and 0.0 < metrics["fid"] < 5.0
