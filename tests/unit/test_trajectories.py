"""Guided teacher trajectories on disk: contents, resumption, settings checks, streaming, batches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.conditioning import Conditioning
from stepdistill.data import trajectories as tr
from stepdistill.data.trajectories import (
    TrajectoryBatches,
    TrajectorySettings,
    collect_trajectories,
)
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.roles import Teacher
from stepdistill.sampling import ode_sample
from stepdistill.schedules import Prediction

TOY = "stepdistill/assets/teachers/toy2d"


@pytest.fixture(scope="module")
def teacher():
    return Teacher(load_denoiser(TOY), guidance_scale=3.0)


def conditions(index: int, n: int) -> Conditioning:
    return Conditioning.labels((torch.arange(n) + index) % 4, 4)


def settings(path, **kw) -> TrajectorySettings:
    base = dict(num_trajectories=12, steps=5, w_min=1.0, w_max=6.0, shard_size=4, batch_size=3, seed=7)
    return TrajectorySettings(path=str(path), **{**base, **kw})


def test_records_are_the_teachers_guided_trajectories(tmp_path, teacher):
    s = settings(tmp_path / "traj")
    report = collect_trajectories(teacher, conditions, s, progress=False)
    assert report["shards"] == report["collected"] == 3 and report["bytes_before"] == 0
    assert report["bytes_after"] == tr.disk_size(tmp_path / "traj") > 0
    shard = load_file(str(tr.shard_path(tmp_path / "traj", 1)))
    assert shard["x_t"].dtype == shard["target"].dtype == torch.float16
    assert shard["x_t"].shape == (4 * 5, 2) and shard["class_labels"].tolist() == [1, 2, 3, 0]
    # trajectory 2 of shard 1, recomputed: same noise and scale draws, guided DDIM / Euler, one record a step
    g = torch.Generator().manual_seed(7 * 1_000_003 + 1)
    scales = 1.0 + 5.0 * torch.rand(4, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 2, generator=g)
    cond = conditions(1, 4)
    seen = []

    def predict(x, t):
        native = teacher.predict(x, t, cond, out=teacher.denoiser.prediction, guidance_scale=scales)
        seen.append((x[2].clone(), t[2].item(), native[2].clone()))
        return teacher.schedule.convert(native, x, t, teacher.denoiser.prediction, Prediction.X0).to(x.dtype)

    ode_sample(predict, teacher.schedule, noise, 5)
    rows = slice(2 * 5, 3 * 5)  # trajectory-major: trajectory 2's five steps
    assert shard["trajectory"][rows].tolist() == [2] * 5
    assert torch.allclose(shard["scale"][rows], scales[2].float().expand(5))
    for i, (x, t, native) in enumerate(seen):
        assert torch.allclose(shard["x_t"][rows][i].float(), x, atol=2e-3)
        assert shard["t"][rows][i].item() == pytest.approx(t)
        assert torch.allclose(shard["target"][rows][i].float(), native, atol=2e-3)


def test_an_interrupted_collection_resumes_without_duplicates_or_losses(tmp_path, teacher):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    collect_trajectories(teacher, conditions, settings(whole), progress=False)
    collect_trajectories(teacher, conditions, settings(resumed, num_trajectories=4), progress=False)
    (resumed / ".shard-00001.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    report = collect_trajectories(teacher, conditions, settings(resumed, batch_size=4), progress=False)
    assert report["collected"] == 2 and report["bytes_before"] > 0
    for i in range(3):
        a, b = load_file(str(tr.shard_path(whole, i))), load_file(str(tr.shard_path(resumed, i)))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_other_settings_or_stray_shards_are_refused_and_kept(tmp_path, teacher):
    collect_trajectories(teacher, conditions, settings(tmp_path / "t", num_trajectories=4), progress=False)
    before = tr.shard_path(tmp_path / "t", 0).read_bytes()
    with pytest.raises(StepdistillError, match="other settings"):
        collect_trajectories(teacher, conditions, settings(tmp_path / "t", w_max=4.0), progress=False)
    assert tr.shard_path(tmp_path / "t", 0).read_bytes() == before
    (tmp_path / "t" / tr.MANIFEST).unlink()
    with pytest.raises(StepdistillError, match="no manifest.json"):
        collect_trajectories(teacher, conditions, settings(tmp_path / "t"), progress=False)


def test_collection_streams_one_shard_at_a_time(tmp_path, teacher, monkeypatch):
    events = []
    collect, write = tr._collect_shard, tr._write_shard
    monkeypatch.setattr(tr, "_collect_shard", lambda *a: events.append(("collect", a[-1])) or collect(*a))
    monkeypatch.setattr(tr, "_write_shard", lambda root, i, t: events.append(("write", i)) or write(root, i, t))
    collect_trajectories(teacher, conditions, settings(tmp_path / "t"), progress=False)
    assert events == [("collect", 0), ("write", 0), ("collect", 1), ("write", 1), ("collect", 2), ("write", 2)]


def test_batches_are_seeded_by_step_and_split_exactly_across_processes(tmp_path, teacher):
    collect_trajectories(teacher, conditions, settings(tmp_path / "t"), progress=False)
    batches = TrajectoryBatches(tmp_path / "t", seed=1, shards_per_batch=2, cache_shards=1)
    whole = batches(5, 8)
    assert set(whole.extras) == {"x_t", "t", "scale", "target"} and whole.extras["x_t"].dtype == torch.float32
    assert len(whole) == 8 and whole.cond.null_class == 4 and len(batches._cache) == 1
    halves = [batches(5, 8, slice(0, 4)), batches(5, 8, slice(4, 8))]
    for key in whole.extras:
        assert torch.equal(torch.cat([h.extras[key] for h in halves]), whole.extras[key])
    assert torch.equal(torch.cat([h.cond.class_labels for h in halves]), whole.cond.class_labels)
    assert not torch.equal(batches(6, 8).extras["x_t"], whole.extras["x_t"])
    # every row is a stored record with its own trajectory's label
    shards = [load_file(str(tr.shard_path(tmp_path / "t", i))) for i in range(3)]
    for x, label in zip(whole.extras["x_t"], whole.cond.class_labels, strict=True):
        hits = [(s, (s["x_t"].float() == x).all(1).nonzero()) for s in shards]
        found = [s["class_labels"][s["trajectory"][r[0, 0]].long()] for s, r in hits if len(r)]
        assert found and int(found[0]) == int(label)


def test_a_corrupt_shard_or_an_empty_directory_fails_clearly(tmp_path, teacher):
    with pytest.raises(StepdistillError, match="no trajectory shards"):
        TrajectoryBatches(tmp_path)
    collect_trajectories(teacher, conditions, settings(tmp_path / "t", num_trajectories=4), progress=False)
    tr.shard_path(tmp_path / "t", 0).write_bytes(b"garbage")
    with pytest.raises(StepdistillError, match="corrupt"):
        TrajectoryBatches(tmp_path / "t")(0, 4)
