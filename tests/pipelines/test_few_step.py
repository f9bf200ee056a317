"""FewStepPipeline and sample_student are Generator.sample, with the documented RNG order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.data.prompts import PromptEncoder
from stepdistill.pipelines import FewStepPipeline, decode_latents, generate, sample_student

PROMPTS = ["a red circle", "two blue star", "a photo of a green square"]
LABELS = [0, 2, 1, 1]


def _reference(generator, cond, steps, seed):
    """The documented order: initial noise first, then Generator.sample draws from the same generator."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(cond), *generator_shape(generator)), generator=g)
    with torch.no_grad():
        return generator.sample(noise, cond, steps, generator=g)


def generator_shape(generator):
    config = generator.denoiser.backbone.config
    return (config.in_channels, config.sample_size, config.sample_size)


@pytest.fixture(scope="module")
def text_pipe(text_student, sd15_dir):
    pipe = FewStepPipeline.from_generator(text_student, sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def class_pipe(class_student):
    return FewStepPipeline.from_generator(class_student)


@pytest.mark.parametrize("steps", [1, 4])
def test_text_pipeline_equals_generator_sample(text_pipe, text_student, sd15_dir, steps):
    cond = PromptEncoder.from_pretrained(sd15_dir).encode(PROMPTS)
    ours = text_pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(7),
                     output_type="latent").images
    assert torch.equal(ours, _reference(text_student, cond, steps, 7))
    images = text_pipe(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(7),
                       output_type="pt").images
    with torch.no_grad():
        assert torch.equal(images, decode_latents(text_pipe.vae, ours))
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("steps", [1, 4])
def test_class_pipeline_equals_generator_sample(class_pipe, class_student, steps):
    cond = Conditioning(class_labels=torch.tensor(LABELS))
    ours = class_pipe(class_labels=LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                      output_type="latent").images
    assert torch.equal(ours, _reference(class_student, cond, steps, 3))
    assert ours.shape == (4, 1, 8, 8)


def test_student_differs_from_teacher_and_steps_matter(class_pipe):
    a = class_pipe(class_labels=LABELS, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    b = class_pipe(class_labels=LABELS, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
    c = class_pipe(class_labels=LABELS, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
                   output_type="latent").images
    assert not torch.allclose(a, b) and not torch.allclose(b, c)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_rng_order_initial_noise_then_one_draw_per_renoising(class_pipe, steps):
    g = torch.Generator().manual_seed(5)
    class_pipe(class_labels=LABELS, num_inference_steps=steps, generator=g, output_type="latent")
    expected = torch.Generator().manual_seed(5)
    for _ in range(steps):  # the initial noise + (steps - 1) fresh noises, each [B, C, H, W]
        torch.randn(len(LABELS), 1, 8, 8, generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())


def test_sample_student_is_the_pipeline_and_batches_share_one_generator(class_pipe, class_student):
    cond = Conditioning(class_labels=torch.tensor(LABELS))
    whole = sample_student(class_student, cond, steps=2, seed=11)
    piped = class_pipe(class_labels=LABELS, num_inference_steps=2, generator=torch.Generator().manual_seed(11),
                       output_type="latent").images
    assert torch.equal(whole, piped)
    batched = sample_student(class_student, cond, steps=2, seed=11, batch_size=3)
    g = torch.Generator().manual_seed(11)
    first = generate(class_student, cond.index(slice(0, 3)), 2, g)
    second = generate(class_student, cond.index(slice(3, 4)), 2, g)
    assert torch.equal(batched, torch.cat([first, second]))
    repeated = sample_student(class_student, Conditioning(class_labels=torch.tensor([2])), num=3, steps=1, seed=0)
    assert repeated.shape == (3, 1, 8, 8)


def test_output_types(class_pipe):
    kw = dict(class_labels=[0, 1], num_inference_steps=1)
    raw = class_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images
    pt = class_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="pt").images
    arr = class_pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").images
    pil = class_pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(pt, (raw / 2 + 0.5).clamp(0, 1))
    assert arr.shape == (2, 8, 8, 1) and np.allclose(arr, pt.permute(0, 2, 3, 1).numpy())
    assert len(pil) == 2 and pil[0].size == (8, 8)


def test_pipeline_save_and_load_round_trip(class_pipe, tmp_path):
    class_pipe.save_pretrained(tmp_path / "pipe")
    loaded = FewStepPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.default_steps == class_pipe.config.default_steps
    kw = dict(class_labels=LABELS, num_inference_steps=4, output_type="latent")
    assert torch.equal(loaded(**kw, generator=torch.Generator().manual_seed(2)).images,
                       class_pipe(**kw, generator=torch.Generator().manual_seed(2)).images)
