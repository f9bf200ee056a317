"""Hybrid sampling (teacher first, student after) on tiny toy teachers, and `stepdistill sample
hybrid_teacher_steps=k`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stepdistill.cli import main
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import load_denoiser, save_denoiser
from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
from stepdistill.errors import StepdistillError
from stepdistill.hybrid import hybrid_plan, hybrid_sample, sample_hybrid, teacher_steps_to_switch
from stepdistill.pipelines import sample_student
from stepdistill.roles import ConsistencyGenerator, Generator, Teacher
from stepdistill.sampling import ddim_jump
from stepdistill.schedules import NoiseSchedule, Prediction

TOY2D_TEACHER = Path(__file__).resolve().parents[2] / "stepdistill" / "assets" / "teachers" / "toy2d"
SCALE = 2.0  # the teacher's default CFG scale: hybrid sampling must use it


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models run fastest single-threaded (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def vp_denoiser() -> ToyDenoiser:
    """A tiny class-conditional eps-prediction MLP on a linear-beta VP table (random weights)."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    return ToyDenoiser(ToyMLP(num_classes=3, hidden=16, layers=1, time_embed_dim=8), schedule, Prediction.EPS)


def student(denoiser, steps: int = 2, t_max: float = 1.0, cls=Generator, **kwargs) -> Generator:
    """A Generator whose weights differ from the teacher's by seeded noise."""
    generator = cls(denoiser, steps=steps, t_max=t_max, **kwargs).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return generator


def inputs(b: int = 5, seed: int = 3) -> tuple[torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, generator=g), Conditioning.labels(torch.tensor([0, 1, 2, 0, 1][:b]), 3)


def hand_teacher_steps(denoiser, noise, cond, grid) -> torch.Tensor:
    """DDIM with CFG at ``SCALE``, written out: x0 = u + s (c - u), then alpha x0 + sigma eps_hat."""
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        tb, tn = t.expand(len(x)), t_next.expand(len(x))
        c, u = denoiser(x, tb, cond), denoiser(x, tb, cond.null())
        x = ddim_jump(denoiser.schedule, x, u + SCALE * (c - u), tb, tn)
    return x


def hand_renoise(generator, x, cond, grid, rng) -> torch.Tensor:
    """The student's re-noising steps along ``grid``, written out."""
    schedule = generator.schedule
    for i, t in enumerate(grid):
        x0 = generator(x, t.expand(len(x)), cond)
        if i + 1 == len(grid):
            return x0
        fresh = torch.randn(x.shape, generator=rng)
        t_next = grid[i + 1].expand(len(x))
        x = schedule.alpha(t_next)[:, None] * x0.double() + schedule.sigma(t_next)[:, None] * fresh.double()
        x = x.to(x0.dtype)
    return x


@pytest.mark.parametrize("t_max", [1.0, 0.7])
def test_zero_teacher_steps_is_exactly_the_students_own_sampling(vp_denoiser, t_max):
    teacher, generator = Teacher(vp_denoiser, SCALE), student(vp_denoiser, steps=3, t_max=t_max)
    noise, cond = inputs()
    expected = generator.sample(noise, cond, generator=torch.Generator().manual_seed(5))
    got = hybrid_sample(teacher, generator, noise, cond, 0, generator_rng=torch.Generator().manual_seed(5))
    assert torch.equal(got, expected)


def test_full_noise_student_gets_the_teachers_first_k_ddim_steps_then_a_respaced_grid(vp_denoiser):
    teacher, generator = Teacher(vp_denoiser, SCALE), student(vp_denoiser, steps=2)
    noise, cond = inputs()
    plan = hybrid_plan(generator, 2)
    full_grid = vp_denoiser.schedule.timesteps(50)  # 999, 979, 959, ...
    assert torch.equal(plan.teacher_grid, full_grid[:3])
    assert vp_denoiser.schedule.to_model_time(plan.student_grid).round().tolist() == [959, 479]
    assert plan.respaced and plan.switch_time == pytest.approx(959 / 999)

    x_switch = teacher_steps_to_switch(teacher, noise, cond, plan.teacher_grid)
    torch.testing.assert_close(x_switch, hand_teacher_steps(vp_denoiser, noise, cond, full_grid[:3]),
                               rtol=1e-5, atol=1e-5)
    # the same x as the first two steps of the teacher's own 50-step sampler (run to completion there)
    seen = []
    predict = teacher.predict
    teacher.predict = lambda x, t, c, **kw: (seen.append(x.clone()), predict(x, t, c, **kw))[1]
    try:
        teacher.sample(noise, cond, 50)
    finally:
        del teacher.predict
    assert torch.equal(seen[2], x_switch)

    got = hybrid_sample(teacher, generator, noise, cond, 2, generator_rng=torch.Generator().manual_seed(7))
    expected = hand_renoise(generator, x_switch, cond, plan.student_grid, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_student_below_pure_noise_keeps_its_grid_and_gets_a_genuine_x_at_t_max(vp_denoiser):
    teacher, generator = Teacher(vp_denoiser, SCALE), student(vp_denoiser, steps=2, t_max=0.7)
    noise, cond = inputs()
    plan = hybrid_plan(generator, 3)
    assert vp_denoiser.schedule.to_model_time(plan.teacher_grid).round().tolist() == [999, 899, 799, 699]
    assert torch.equal(plan.student_grid, generator.grid()) and not plan.respaced
    x_switch = hand_teacher_steps(vp_denoiser, noise, cond, plan.teacher_grid)
    got = hybrid_sample(teacher, generator, noise, cond, 3, generator_rng=torch.Generator().manual_seed(2))
    expected = generator.sample(x_switch, cond, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, hybrid_sample(teacher, generator, noise, cond, 0,
                                                 generator_rng=torch.Generator().manual_seed(2)))


def test_flow_teacher_first_steps_are_its_euler_steps():
    denoiser = load_denoiser(TOY2D_TEACHER)
    teacher, generator = Teacher(denoiser, SCALE), student(denoiser, steps=1)
    noise, cond = inputs()
    plan = hybrid_plan(generator, 1, teacher_grid_steps=4)
    assert plan.teacher_grid.tolist() == [1.0, 0.75] and plan.student_grid.tolist() == [0.75]
    x_switch = hand_teacher_steps(denoiser, noise, cond, plan.teacher_grid)
    got = hybrid_sample(teacher, generator, noise, cond, 1, teacher_grid_steps=4)
    torch.testing.assert_close(got, generator(x_switch, torch.full((5,), 0.75, dtype=torch.float64), cond),
                               rtol=1e-5, atol=1e-5)


def test_sample_hybrid_is_reproducible_and_k0_equals_sample_student(vp_denoiser):
    teacher, generator = Teacher(vp_denoiser, SCALE), student(vp_denoiser, steps=3)
    cond = Conditioning.labels(torch.tensor([0, 1, 2, 0, 1, 2, 0]), 3)
    expected = sample_student(generator, cond, 7, 3, seed=4, batch_size=3)
    assert torch.equal(sample_hybrid(teacher, generator, cond, 7, 0, steps=3, seed=4, batch_size=3), expected)
    first = sample_hybrid(teacher, generator, cond, 7, 2, seed=4, batch_size=3)
    assert torch.equal(first, sample_hybrid(teacher, generator, cond, 7, 2, seed=4, batch_size=3))
    assert not torch.equal(first, sample_hybrid(teacher, generator, cond, 7, 2, seed=5, batch_size=3))


@pytest.mark.parametrize("k", [-1, 50, 1.5])
def test_bad_teacher_steps_is_a_one_line_error(vp_denoiser, k):
    teacher, generator = Teacher(vp_denoiser, SCALE), student(vp_denoiser)
    noise, cond = inputs()
    with pytest.raises(StepdistillError) as err:
        hybrid_sample(teacher, generator, noise, cond, k)
    assert "hybrid_teacher_steps" in str(err.value) and len(str(err.value).splitlines()) == 1


def test_generators_with_their_own_grid_are_not_respaced(vp_denoiser):
    teacher, noise_cond = Teacher(vp_denoiser, SCALE), inputs()
    consistency = student(vp_denoiser, steps=2, cls=ConsistencyGenerator, solver_steps=10)
    with pytest.raises(StepdistillError, match="cannot re-space the grid of a ConsistencyGenerator"):
        hybrid_sample(teacher, consistency, *noise_cond, 1)
    expected = consistency.sample(*noise_cond, generator=torch.Generator().manual_seed(1))
    got = hybrid_sample(teacher, consistency, *noise_cond, 0, generator_rng=torch.Generator().manual_seed(1))
    assert torch.equal(got, expected)
    own = student(vp_denoiser, steps=2, timesteps=[999, 300])
    with pytest.raises(StepdistillError, match=r"cannot re-space generator.timesteps=\[999.0, 300.0\]"):
        hybrid_sample(teacher, own, *noise_cond, 1)
    below = student(vp_denoiser, steps=2, t_max=0.7, cls=ConsistencyGenerator, solver_steps=10)
    plan = hybrid_plan(below, 2)  # below pure noise its own grid is kept, so any generator works
    assert torch.equal(plan.student_grid, below.grid()) and plan.teacher_grid[-1] == below.grid()[0]


# --------------------------------------------------------------------------- the CLI key
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    """A run directory (config.yaml + student/) whose teacher is the shipped toy2d teacher."""
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("runs") / "toy_run"
    root.mkdir()
    generator = student(load_denoiser(TOY2D_TEACHER), steps=2)
    config = {"teacher": {"path": str(TOY2D_TEACHER), "guidance_scale": SCALE},
              "generator": {"_target_": "stepdistill.roles.Generator", "steps": 2, "t_max": 1.0}}
    OmegaConf.save(OmegaConf.create(config), root / "config.yaml")
    save_denoiser(generator.denoiser, root / "student")
    return root


def test_cli_hybrid_key_samples_and_records_k(toy_run, tmp_path):
    from stepdistill.pipelines import load_run

    assert main(["sample", f"run={toy_run}", "num_images=6", "seed=3", f"out={tmp_path / 'plain'}"]) == 0
    assert main(["sample", f"run={toy_run}", "num_images=6", "seed=3", "hybrid_teacher_steps=0",
                 f"out={tmp_path / 'k0'}"]) == 0
    assert main(["sample", f"run={toy_run}", "num_images=6", "seed=3", "hybrid_teacher_steps=2",
                 f"out={tmp_path / 'k2'}"]) == 0
    plain = json.loads((tmp_path / "plain" / "samples.json").read_text())
    assert "hybrid_teacher_steps" not in plain  # without the key: the record as before
    assert np.array_equal(np.load(tmp_path / "k0" / "samples.npy"), np.load(tmp_path / "plain" / "samples.npy"))
    record = json.loads((tmp_path / "k2" / "samples.json").read_text())
    assert record["hybrid_teacher_steps"] == 2 and record["teacher_guidance_scale"] == SCALE
    assert record["teacher_timesteps"] == [1000.0, 980.0] and record["switch_timestep"] == 960.0
    assert record["timesteps"] == [960.0, 480.0]

    run = load_run(toy_run)
    teacher = Teacher(load_denoiser(TOY2D_TEACHER), SCALE)
    cond = Conditioning.labels(torch.tensor(record["labels"]), 4)
    expected = sample_hybrid(teacher, run.generator, cond, 6, 2, seed=3)
    np.testing.assert_allclose(np.load(tmp_path / "k2" / "samples.npy"), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k, message", [("-1", "must be in 0..49"), ("50", "must be in 0..49"),
                                        ("two", "hybrid_teacher_steps='two' is not a valid int")])
def test_cli_bad_k_is_one_line_and_writes_nothing(toy_run, tmp_path, capsys, k, message):
    out = tmp_path / "o"
    assert main(["sample", f"run={toy_run}", f"hybrid_teacher_steps={k}", f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_cli_hybrid_without_a_teacher_path_is_one_line(tmp_path, capsys):
    from omegaconf import OmegaConf

    generator = student(load_denoiser(TOY2D_TEACHER), steps=1)
    OmegaConf.save(OmegaConf.create({"generator": {"steps": 1}}), tmp_path / "config.yaml")
    save_denoiser(generator.denoiser, tmp_path / "student")
    assert main(["sample", f"run={tmp_path}", "hybrid_teacher_steps=1", f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no teacher.path" in err and len(err.splitlines()) == 1, err


def test_cli_sample_records_the_generators_own_timesteps(toy_run, tmp_path):
    """A run whose generator has ``timesteps`` samples on them (and says so in samples.json)."""
    from omegaconf import OmegaConf

    from stepdistill.pipelines import load_run

    own = Path(shutil.copytree(toy_run, tmp_path / "own_run"))
    config = OmegaConf.load(own / "config.yaml")
    config.generator.timesteps = [1000.0, 300.0]
    OmegaConf.save(config, own / "config.yaml")
    assert main(["sample", f"run={own}", "num_images=6", "seed=3", f"out={tmp_path / 'own'}"]) == 0
    record = json.loads((tmp_path / "own" / "samples.json").read_text())
    assert record["timesteps"] == [1000.0, 300.0]
    cond = Conditioning.labels(torch.tensor(record["labels"]), 4)
    expected = sample_student(load_run(own).generator, cond, 6, 2, 3)
    np.testing.assert_allclose(np.load(tmp_path / "own" / "samples.npy"), expected.numpy(), rtol=1e-6, atol=1e-6)
