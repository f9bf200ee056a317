"""FewStepPipeline(negative_prompt=...) steers a one-step text student's cross-attention (SNOOPI's NASA)."""

from __future__ import annotations

import pytest
import torch

from stepdistill.data.prompts import PromptEncoder
from stepdistill.kernels import negative_prompt_steering
from stepdistill.pipelines import FewStepPipeline

PROMPTS = ["a red circle", "two blue star", "a photo of a green square"]
NEGATIVE = "a blue square"
SEED = 7


@pytest.fixture(scope="module")
def text_pipe(text_student, sd15_dir):
    pipe = FewStepPipeline.from_generator(text_student, sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_step(pipe, prompts=PROMPTS, **kwargs):
    return pipe(prompts, num_inference_steps=1, generator=torch.Generator().manual_seed(SEED),
                output_type="latent", **kwargs).images


def processors(pipe):
    return dict(pipe.unet.attn_processors)


def test_negative_prompt_changes_the_one_step_sample_and_restores_processors(text_pipe):
    before = processors(text_pipe)
    plain = one_step(text_pipe)
    steered = one_step(text_pipe, negative_prompt=NEGATIVE)
    after = processors(text_pipe)
    assert after.keys() == before.keys() and all(after[name] is before[name] for name in before)
    assert steered.shape == plain.shape and torch.isfinite(steered).all()
    assert (steered - plain).abs().max() > 1e-2
    assert torch.equal(one_step(text_pipe), plain)  # nothing left behind
    stronger = one_step(text_pipe, negative_prompt=NEGATIVE, negative_scale=1.0)
    assert (stronger - steered).abs().max() > 1e-2


def test_negative_scale_zero_is_the_plain_sample(text_pipe):
    assert torch.equal(one_step(text_pipe, negative_prompt=NEGATIVE, negative_scale=0.0), one_step(text_pipe))


def test_pipeline_is_generator_sample_inside_the_steering_context(text_pipe, text_student, sd15_dir):
    encoder = PromptEncoder.from_pretrained(sd15_dir)
    cond, negative = encoder.encode(PROMPTS), encoder.encode([NEGATIVE]).prompt_embeds
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn((len(PROMPTS), *text_student.denoiser.sample_shape), generator=g)
    with torch.no_grad(), negative_prompt_steering(text_student.denoiser.backbone, negative, scale=0.5):
        expected = text_student.sample(noise, cond, 1, generator=g)
    assert torch.equal(one_step(text_pipe, negative_prompt=NEGATIVE), expected)


def test_one_negative_prompt_per_prompt(text_pipe):
    shared = one_step(text_pipe, negative_prompt=NEGATIVE, num_images_per_prompt=2)
    per_prompt = one_step(text_pipe, negative_prompt=[NEGATIVE] * 3, num_images_per_prompt=2)
    assert torch.equal(per_prompt, shared)
    mixed = one_step(text_pipe, negative_prompt=[NEGATIVE, "a red circle", NEGATIVE], num_images_per_prompt=2)
    assert torch.equal(mixed[:2], shared[:2]) and torch.equal(mixed[4:], shared[4:])
    assert (mixed[2:4] - shared[2:4]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="got 2 negative prompts for 3 prompts; pass 1 or 3"):
        one_step(text_pipe, negative_prompt=[NEGATIVE] * 2)


def test_students_without_prompts_reject_a_negative_prompt(text_pipe, class_student):
    class_pipe = FewStepPipeline.from_generator(class_student)
    message = "negative_prompt= steers a text-to-image student's cross-attention: pass prompt="
    with pytest.raises(ValueError, match=message):
        class_pipe(class_labels=[0, 1], negative_prompt=NEGATIVE, output_type="latent")
    with pytest.raises(ValueError, match=message):
        class_pipe(batch_size=2, negative_prompt=NEGATIVE, output_type="latent")
    with pytest.raises(ValueError, match=message):
        text_pipe(batch_size=2, negative_prompt=NEGATIVE, output_type="latent")
