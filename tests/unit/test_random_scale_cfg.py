"""Random-scale CFG: a scale range draws one scale per sample per teacher call (per trajectory when
sampling), in DMD2, f-distill and SiD alike."""

from __future__ import annotations

import pytest
import torch

from stepdistill.algorithms.dmd2 import DMD2
from stepdistill.algorithms.fdistill import FDistill
from stepdistill.algorithms.sid import SiD
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.guidance import draw_scale, guided_predict, parse_scale, representative_scale
from stepdistill.roles import Critic, Generator, Teacher

TOY = "stepdistill/assets/teachers/toy2d"


@pytest.fixture(scope="module")
def denoiser():
    return load_denoiser(TOY)


def test_scales_parse_from_numbers_and_ranges():
    assert parse_scale(3) == 3.0 and parse_scale([2, 5]) == (2.0, 5.0) and parse_scale([4, 4]) == 4.0
    assert representative_scale((2.0, 5.0)) == 3.5 and representative_scale(2.0) == 2.0
    with pytest.raises(ValueError, match="lo <= hi"):
        parse_scale([5, 2])
    with pytest.raises(ValueError, match="a number or a range"):
        parse_scale("strong")
    torch.manual_seed(0)
    draws = draw_scale((2.0, 5.0), 10_000)
    assert draws.shape == (10_000,) and 2.0 <= draws.min() and draws.max() <= 5.0
    assert draws.mean().item() == pytest.approx(3.5, abs=0.05)
    assert draw_scale(3.0, 4) == 3.0


def test_a_range_teacher_guides_each_sample_at_its_own_draw(denoiser):
    teacher = Teacher(denoiser, guidance_scale=[2.0, 5.0])
    x = torch.randn(6, 2)
    t = torch.full((6,), 0.4, dtype=torch.float64)
    cond = Conditioning.labels(torch.arange(6) % 4, 4)
    torch.manual_seed(11)
    out = teacher.predict(x, t, cond)
    torch.manual_seed(11)
    scales = draw_scale((2.0, 5.0), 6)
    assert torch.equal(out, guided_predict(denoiser, x, t, cond, scales))
    assert not torch.allclose(out, teacher.predict(x, t, cond, guidance_scale=3.5))
    assert teacher.nfe(10) == 20


def test_a_range_teacher_samples_with_one_scale_per_trajectory(denoiser):
    teacher = Teacher(denoiser, guidance_scale=[2.0, 5.0])
    noise = torch.randn(5, 2)
    cond = Conditioning.labels(torch.arange(5) % 4, 4)
    torch.manual_seed(3)
    sampled = teacher.sample(noise, cond, 4)
    torch.manual_seed(3)
    scales = draw_scale((2.0, 5.0), 5)
    assert torch.equal(sampled, Teacher(denoiser).sample(noise, cond, 4, guidance_scale=scales))


@pytest.mark.parametrize("cls, key", [(DMD2, "guidance_scale"), (FDistill, "guidance_scale"), (SiD, "guidance_teacher")])
def test_distribution_matching_algorithms_take_a_teacher_scale_range(denoiser, cls, key):
    teacher = Teacher(denoiser)
    algo = cls(teacher, Generator(denoiser), Critic(denoiser, head=True), **{key: [2, 6]})
    assert getattr(algo, key) == (2.0, 6.0)
    x = torch.randn(4, 2)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    cond = Conditioning.labels(torch.arange(4), 4)
    torch.manual_seed(5)
    got = teacher.predict(x, t, cond, guidance_scale=getattr(algo, key))
    torch.manual_seed(5)
    assert torch.equal(got, guided_predict(denoiser, x, t, cond, draw_scale((2.0, 6.0), 4)))
