"""LoRA students (peft): the teacher is the same network with its adapters off, the merged copy
equals the student, and the adapters' EMA (a LoRA student's target network) swaps in and out."""

import pytest
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import wrap_backbone
from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
from stepdistill.lora import (
    LoraEMA,
    diffusers_lora_state_dict,
    lora_named_parameters,
    merged_backbone,
)
from stepdistill.roles import Generator, Teacher
from stepdistill.schedules import NoiseSchedule, Prediction


@pytest.fixture()
def pair():
    torch.manual_seed(0)
    teacher = Teacher(ToyDenoiser(ToyMLP(num_classes=2, hidden=16, layers=2), NoiseSchedule.flow(), Prediction.FLOW))
    reference = [p.detach().clone() for p in teacher.base_parameters()]
    student = Generator(teacher.denoiser, lora_rank=2, lora_alpha=6, lora_target_modules=["proj_in", "linear_1"])
    with torch.no_grad():
        for _, p in lora_named_parameters(student.denoiser.backbone):
            p.add_(0.3 * torch.randn_like(p))
    return teacher, student, reference


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 2, generator=g), torch.rand(5, generator=g).double(), Conditioning.labels(torch.arange(5) % 2, 2)


def test_teacher_is_the_base_and_only_adapters_train(pair):
    teacher, student, reference = pair
    x, t, cond = inputs()
    base = ToyDenoiser(ToyMLP(num_classes=2, hidden=16, layers=2), NoiseSchedule.flow(), Prediction.FLOW)
    with torch.no_grad():
        for p, ref in zip(base.parameters(), reference, strict=True):
            p.copy_(ref)
        torch.testing.assert_close(teacher.predict(x, t, cond), base(x, t, cond))
        assert (student(x, t, cond) - base(x, t, cond)).abs().max() > 1e-3
    assert student.denoiser is teacher.denoiser
    assert {n.split(".lora_")[0] for n, p in student.named_parameters() if p.requires_grad} == \
        {"denoiser.backbone.proj_in", "denoiser.backbone.time_embedding.linear_1"}


def test_merged_copy_and_diffusers_weights(pair):
    _, student, _ = pair
    x, t, cond = inputs()
    merged = wrap_backbone(merged_backbone(student.denoiser.backbone), student.schedule)
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, cond), student(x, t, cond), atol=1e-5, rtol=1e-5)
    state = diffusers_lora_state_dict(student.denoiser.backbone)
    layer = student.denoiser.backbone.proj_in
    a, b = state["unet.proj_in.lora_A.weight"], state["unet.proj_in.lora_B.weight"]
    torch.testing.assert_close(b @ a, layer.get_delta_weight("student"))  # alpha / rank folded into B


def test_lora_ema_updates_and_swaps_in_and_out(pair):
    _, student, _ = pair
    backbone = student.denoiser.backbone
    ema = LoraEMA(backbone)
    start = {n: p.detach().clone() for n, p in lora_named_parameters(backbone)}
    with torch.no_grad():
        for _, p in lora_named_parameters(backbone):
            p.add_(1.0)
    ema.update(backbone, decay=0.75)
    x, t, cond = inputs()
    online = student(x, t, cond).detach()
    with ema.swapped_in(backbone):
        for n, p in lora_named_parameters(backbone):
            torch.testing.assert_close(p.detach(), 0.75 * start[n] + 0.25 * (start[n] + 1.0))
        assert (student(x, t, cond) - online).abs().max() > 1e-4
    torch.testing.assert_close(student(x, t, cond).detach(), online)
    assert all(p.requires_grad for _, p in lora_named_parameters(backbone))
