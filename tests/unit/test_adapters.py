"""AGD's guidance adapters: zero start, activity only inside ``active``, switching off, files, other
checkpoints of the same base, copies, targets, and the cross-attention adapter's formula."""

from __future__ import annotations

import copy

import pytest
import torch

from stepdistill.adapters import (
    CrossAttentionAdapter,
    GuidanceAdapters,
    _Context,
    default_targets,
    parameter_count,
)
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.roles import AdapterGenerator, Teacher
from stepdistill.schedules import Prediction
from stepdistill.tiny_stacks import tiny_stack_dir

DIGITS = "stepdistill/assets/teachers/digits"
TOY = "stepdistill/assets/teachers/toy2d"


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
    cond = Conditioning.labels(torch.arange(n) % 10, 10).with_guidance(torch.linspace(1.0, 6.0, n))
    return x, t, cond


def _perturb(adapters: GuidanceAdapters, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def digits_teacher():
    return Teacher(load_denoiser(DIGITS), guidance_scale=3.0)


@pytest.fixture()
def generator(digits_teacher):
    gen = AdapterGenerator(digits_teacher.denoiser, dim=32, attn_dim=8)
    yield gen
    gen.adapters.detach()


@pytest.mark.parametrize("kind", ["cross_attention", "offset"])
def test_fresh_adapters_are_the_base_model_at_every_scale_and_then_learn_to_differ(digits_teacher, kind):
    x, t, cond = _inputs()
    gen = AdapterGenerator(digits_teacher.denoiser, kind=kind, dim=32, attn_dim=8)
    base = digits_teacher.predict(x, t, cond, out=Prediction.EPS, guidance_scale=1.0)
    with torch.no_grad():
        assert torch.equal(gen(x, t, cond, out=Prediction.EPS), base)
    _perturb(gen.adapters)
    with torch.no_grad():
        low, high = gen(x, t, cond.with_guidance(torch.full((6,), 1.5))), gen(x, t, cond.with_guidance(torch.full((6,), 5.0)))
    assert (low - high).abs().max() > 1e-3  # the output depends on the scale
    gen.adapters.detach()


def test_adapters_act_only_inside_active_and_switch_off(digits_teacher, generator):
    x, t, cond = _inputs()
    base = digits_teacher.predict(x, t, cond, out=Prediction.EPS, guidance_scale=1.0)
    _perturb(generator.adapters)
    with torch.no_grad():
        adapted = generator(x, t, cond, out=Prediction.EPS)
        with generator.adapters.disabled():
            off = generator(x, t, cond, out=Prediction.EPS)
    assert (adapted - base).abs().max() > 1e-2
    assert torch.equal(off, base)  # adapters off: the base model again
    # the teacher shares the network and still runs the base model
    assert torch.equal(digits_teacher.predict(x, t, cond, out=Prediction.EPS, guidance_scale=1.0), base)


def test_only_the_adapters_train_and_their_share_of_the_digits_unet(digits_teacher, generator):
    trainable = generator.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for p in generator.adapters.parameters()}
    assert not any(p.requires_grad for p in digits_teacher.parameters())
    # the shipped digits/agd setting: 12 residual blocks, context width 32, attention width 8
    assert parameter_count(generator.adapters) == 23_104
    assert parameter_count(digits_teacher.denoiser) == 902_529  # 2.56 %


def test_save_load_round_trip_and_another_checkpoint_of_the_base(tmp_path, digits_teacher, generator):
    x, t, cond = _inputs()
    _perturb(generator.adapters)
    with torch.no_grad():
        before = generator(x, t, cond)
    generator.adapters.save(tmp_path / "adapters")
    other = copy.deepcopy(digits_teacher.denoiser)  # "another checkpoint": same base, changed weights
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    loaded = AdapterGenerator(other, adapters_path=str(tmp_path / "adapters"))
    fresh_on_other = AdapterGenerator(copy.deepcopy(other))
    with torch.no_grad():
        assert torch.allclose(AdapterGenerator(digits_teacher.denoiser, adapters_path=str(tmp_path / "adapters"))(
            x, t, cond), before, atol=1e-6)
        on_other, base_other = loaded(x, t, cond), fresh_on_other(x, t, cond)
    assert (on_other - base_other).abs().max() > 1e-2  # the adapters act on the other checkpoint too
    assert loaded.settings()["target_modules"] == default_targets(digits_teacher.denoiser.backbone)


def test_loading_onto_another_base_or_a_corrupt_file_fails_clearly(tmp_path, generator):
    generator.adapters.save(tmp_path / "adapters")
    toy = load_denoiser(TOY)
    with pytest.raises(StepdistillError, match="condition"):
        GuidanceAdapters.load(tmp_path / "adapters", toy)
    (tmp_path / "adapters" / "adapters.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StepdistillError, match="corrupt"):
        GuidanceAdapters.load(tmp_path / "adapters", generator.denoiser)
    with pytest.raises(StepdistillError, match="holds no adapters"):
        GuidanceAdapters.load(tmp_path / "missing", generator.denoiser)


def test_a_deep_copy_adapts_its_own_backbone(generator):
    x, t, cond = _inputs()
    twin = copy.deepcopy(generator)
    _perturb(twin.adapters)
    with torch.no_grad():
        original, copied = generator(x, t, cond), twin(x, t, cond)
        with generator.adapters.disabled():
            base = generator(x, t, cond)
    assert torch.equal(original, base)  # the copy's hooks do not reach the original
    assert (copied - original).abs().max() > 1e-2


def test_default_targets():
    digits = load_denoiser(DIGITS).backbone
    assert default_targets(digits) == [n for n, m in digits.named_modules() if type(m).__name__ == "ResnetBlock2D"]
    assert default_targets(load_denoiser(TOY).backbone) == ["blocks.0", "blocks.1", "blocks.2"]
    sd = load_denoiser(tiny_stack_dir("sd15")).backbone
    targets = default_targets(sd)
    assert targets and all(n.endswith("attn2") for n in targets)


def test_cross_attention_adapter_formula():
    torch.manual_seed(0)
    adapter = CrossAttentionAdapter(channels=4, dim=3, attn_dim=2, heads=1)
    torch.nn.init.normal_(adapter.to_out.weight)
    ctx = _Context()
    ctx.tokens = torch.randn(2, 3, 3)
    hidden = torch.randn(2, 4, 2, 2)
    tokens = hidden.flatten(2).transpose(1, 2)  # [B, HW, C]
    normed = (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-5)
    q, k, v = normed @ adapter.to_q.weight.T, ctx.tokens @ adapter.to_k.weight.T, ctx.tokens @ adapter.to_v.weight.T
    attended = torch.softmax(q @ k.transpose(1, 2) / 2 ** 0.5, -1) @ v
    delta = attended @ adapter.to_out.weight.T + adapter.to_out.bias
    expected = hidden + delta.transpose(1, 2).reshape(2, 4, 2, 2)
    assert torch.allclose(adapter(hidden, ctx), expected, atol=1e-6)


def test_adapters_need_the_scale(generator):
    x, t, _ = _inputs()
    with pytest.raises(ValueError, match="CFG scale"):
        with generator.adapters.active(t, Conditioning.labels(torch.zeros(6, dtype=torch.long), 10)):
            pass


def test_guiding_puts_the_adapters_on_another_students_own_sampler(tmp_path, digits_teacher, generator):
    from stepdistill.roles import Generator

    _perturb(generator.adapters)
    student = Generator(digits_teacher.denoiser, steps=2, t_max=0.7, copy=True)  # e.g. a DMD2 student
    adapters = GuidanceAdapters.load(generator.adapters.save(tmp_path / "adapters"), student.denoiser)
    noise, cond = torch.randn(4, 1, 8, 8), Conditioning.labels(torch.arange(4), 10)
    rng = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        plain = student.sample(noise, cond, generator=rng())
        with adapters.guiding(student.denoiser, 3.0):
            guided = student.sample(noise, cond, generator=rng())
        # by hand: the student's own re-noising sampler with every forward inside active(t, cond at 3)
        from stepdistill.sampling import renoise_sample

        def adapted(x, t):
            with adapters.active(t, cond.with_guidance(3.0)):
                return student(x, t, cond)

        by_hand = renoise_sample(adapted, student.schedule, noise, student.grid(), generator=rng())
        after = student.sample(noise, cond, generator=rng())
    assert torch.equal(guided, by_hand) and torch.equal(after, plain)
    assert (guided - plain).abs().max() > 1e-2

