"""Inception FID offline, from the TorchScript file ``make inception`` fetches (``make test`` does it
first): eval-fid end to end on a few tiny PNGs, its JSON, the statistics cache, and FID(x, x) = 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from stepdistill.cli import main
from stepdistill.eval import features
from stepdistill.eval.fid import compute_fid

N = 4  # images per set: ~1 s each through Inception on one CPU thread


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Single-threaded (see ``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="module")
def inception_file():
    path = features.find_inception_file()
    if path is None:
        pytest.fail(f"the Inception TorchScript file is missing: run `make inception` (it fetches "
                    f".venv/stepdistill-fid/{features.INCEPTION_FILE}; `make test` does it first)")
    return path


def _write_images(directory, seed: int, shift: int = 0) -> None:
    """N smooth colour images of different sizes (and one grey, one JPEG)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for i in range(N):
        size = 24 + 8 * i
        grid = np.linspace(0, 1, size)
        base = np.stack([np.outer(grid, grid ** (c + 1)) for c in range(3)], axis=-1)
        image = np.clip(255 * base * rng.uniform(0.5, 1.0, 3) + shift + rng.normal(0, 8, base.shape), 0, 255)
        picture = Image.fromarray(image.astype(np.uint8))
        if i == 1:
            picture = picture.convert("L")
        picture.save(directory / (f"{i}.jpg" if i == 2 else f"{i}.png"))


def test_inception_fid_offline_json_cache_and_self_distance(tmp_path, monkeypatch, inception_file, capsys):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))
    assert features.file_sha1(inception_file) == features.INCEPTION_SHA1
    real, fake = tmp_path / "real", tmp_path / "fake"
    _write_images(real, seed=0)
    _write_images(fake, seed=1, shift=60)
    out = tmp_path / "fid.json"
    assert main(["eval-fid", f"real={real}", f"fake={fake}", "feature=inception", f"out={out}", "device=cpu"]) == 0
    record = json.loads(out.read_text())
    assert set(record) == {"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake", "feature",
                           "protocol", "real", "fake"}
    assert (record["n_real"], record["n_fake"], record["feature"]) == (N, N, "inception")
    assert record["protocol"] == "clean-bicubic-299"
    assert np.isfinite(record["fid"]) and record["fid"] > 1.0 and np.isfinite(record["kid_mean"])
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
    assert f"FID {record['fid']:.4f} ({N} real, {N} fake, inception)" in capsys.readouterr().out
    print(f"inception FID real vs fake: {record['fid']:.4f}, KID {record['kid_mean']:.5f}")

    # the real statistics were cached: a second call reads them and computes the fake features only
    (cached,) = (tmp_path / "cache" / "fid_stats").glob("*.npz")
    mtime = cached.stat().st_mtime_ns
    with np.load(cached) as data:
        assert data["features"].shape == (N, 2048) and str(data["protocol"]) == "clean-bicubic-299"
    calls = []
    extract = features.FeatureExtractor.__call__
    monkeypatch.setattr(features.FeatureExtractor, "__call__",
                        lambda self, batch: calls.append(len(batch)) or extract(self, batch))
    same = compute_fid(real, real, "inception", inception_path=inception_file, progress=False, device="cpu")
    assert calls == [N] and cached.stat().st_mtime_ns == mtime
    print(f"inception FID real vs itself: {same['fid']:.3g}")
    assert abs(same["fid"]) < 1e-6 * record["fid"]
    assert same["precision"] == same["recall"] == 1.0
