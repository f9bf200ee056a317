"""Tiny SD1.5 / SDXL / SD3 stacks: saved and loaded offline, adapters, CFG, prompts, DDIM parity."""

import os
from dataclasses import dataclass
from typing import Any

import diffusers
import pytest
import torch
from torch.testing import assert_close

from stepdistill import tiny_stacks
from stepdistill.data.prompts import PromptEncoder, TextStack
from stepdistill.denoisers.base import Denoiser
from stepdistill.denoisers.diffusers import SD3Denoiser, UNet2DConditionDenoiser
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.roles import Teacher
from stepdistill.schedules import Prediction

PROMPTS = ["a red circle", "two blue stars on a white square"]
SPECS = {  # name -> (builder, in-memory components, pipeline class, adapter, latent channels)
    "sd15": (tiny_stacks.build_tiny_sd15, tiny_stacks.sd15_components, "StableDiffusionPipeline",
             UNet2DConditionDenoiser, 4),
    "sdxl": (tiny_stacks.build_tiny_sdxl, tiny_stacks.sdxl_components, "StableDiffusionXLPipeline",
             UNet2DConditionDenoiser, 4),
    "sd3": (tiny_stacks.build_tiny_sd3, tiny_stacks.sd3_components, "StableDiffusion3Pipeline", SD3Denoiser, 16),
}

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Stack:
    name: str
    path: Any
    denoiser: Denoiser
    encoder: PromptEncoder
    pipe: Any
    adapter: type
    channels: int

    @property
    def backbone(self) -> torch.nn.Module:  # the pipeline's own copy, loaded separately from disk
        return self.pipe.transformer if self.name == "sd3" else self.pipe.unet


@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """name -> Stack, each built, saved and loaded back once per module."""
    cache: dict[str, Stack] = {}

    def get(name: str) -> Stack:
        if name not in cache:
            build, _, pipeline_cls, adapter, channels = SPECS[name]
            path = build(tmp_path_factory.mktemp(name))
            pipe = getattr(diffusers, pipeline_cls).from_pretrained(path)
            pipe.set_progress_bar_config(disable=True)
            cache[name] = Stack(name, path, load_denoiser(path), PromptEncoder.from_pretrained(path), pipe,
                                adapter, channels)
        return cache[name]

    return get


@pytest.fixture(params=list(SPECS))
def stack(request, stacks) -> Stack:
    return stacks(request.param)


def _latents(stack: Stack, b: int = 2) -> torch.Tensor:
    return torch.randn(b, stack.channels, 8, 8)


# --------------------------------------------------------------------------- (a) adapters
def test_adapter_x0_matches_backbone_by_hand(stack):
    den, cond = stack.denoiser, stack.encoder.encode(PROMPTS)
    assert type(den) is stack.adapter
    x = _latents(stack)
    with torch.no_grad():
        if stack.name == "sd3":
            assert den.prediction == Prediction.FLOW and den.schedule.kind == "flow"
            t = torch.tensor([0.3, 0.8])
            v = stack.backbone(hidden_states=x, timestep=t * 1000, encoder_hidden_states=cond.prompt_embeds,
                               pooled_projections=cond.pooled_embeds).sample
            x0 = x - t.view(-1, 1, 1, 1) * v
        else:
            assert den.prediction == Prediction.EPS and den.schedule.kind == "vp"
            steps = torch.tensor([250, 700])
            t = steps / 999
            added = None
            if stack.name == "sdxl":
                added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.time_ids}
            eps = stack.backbone(x, steps, encoder_hidden_states=cond.prompt_embeds,
                                 added_cond_kwargs=added).sample
            ab = stack.pipe.scheduler.alphas_cumprod[steps].view(-1, 1, 1, 1)
            x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        ours = den(x, t, cond, out=Prediction.X0)
    assert_close(ours, x0, atol=1e-5, rtol=1e-5)
    feats = den.features(x, t, cond)
    assert len(feats) == 1 and next(iter(feats.values())).shape[0] == 2


# --------------------------------------------------------------------------- (b) CFG
def test_teacher_cfg_is_u_plus_s_times_c_minus_u(stack):
    den, cond = stack.denoiser, stack.encoder.encode(PROMPTS)
    teacher = Teacher(den)
    x, t = _latents(stack), torch.tensor([0.4, 0.9])
    c, u = den(x, t, cond), den(x, t, cond.null())
    assert (c - u).abs().max() > 1e-4  # the prompt matters
    assert_close(teacher.predict(x, t, cond, guidance_scale=1.0), c)
    for scale in (0.0, 4.5):
        # one batched [cond; null] forward vs two separate ones: float32 batching noise only
        assert_close(teacher.predict(x, t, cond, guidance_scale=scale), u + scale * (c - u), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- (c) round trips
def test_saved_stack_loads_back_offline_identically(stack):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    built = SPECS[stack.name][1]()  # the same seed, in memory
    backbone_name = "transformer" if stack.name == "sd3" else "unet"
    pairs = [(built[backbone_name], stack.denoiser.backbone), (built[backbone_name], stack.backbone),
             (built["vae"], stack.pipe.vae)]
    pairs += [(built[n], getattr(stack.pipe, n)) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
              if built.get(n) is not None]
    for mem, disk in pairs:
        mem_sd, disk_sd = mem.state_dict(), disk.state_dict()
        assert mem_sd.keys() == disk_sd.keys()
        for k in mem_sd:
            assert torch.equal(mem_sd[k], disk_sd[k]), k
    assert built["tokenizer"](PROMPTS).input_ids == stack.pipe.tokenizer(PROMPTS).input_ids
    cond, x, t = stack.encoder.encode(PROMPTS), _latents(stack), torch.tensor([0.5, 0.7])
    again = load_denoiser(stack.path)
    assert torch.equal(again(x, t, cond), stack.denoiser(x, t, cond))
    again_cond = PromptEncoder.from_pretrained(stack.path).encode(PROMPTS)
    assert torch.equal(again_cond.prompt_embeds, cond.prompt_embeds)
    images = stack.pipe(PROMPTS, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and images.std() > 0


# --------------------------------------------------------------------------- (d) prompts
def _pipeline_embeds(stack: Stack, negative: str | None = None) -> tuple:
    """(embeds, negative embeds, pooled, negative pooled) from the pipeline's own encode_prompt."""
    pipe = stack.pipe
    if stack.name == "sd15":  # this pipeline wants a list of negatives for a list of prompts
        negative = None if negative is None else [negative] * len(PROMPTS)
        return (*pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=negative), None, None)
    if stack.name == "sdxl":
        return pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative)
    return pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
                              negative_prompt=negative)


def _check_against_pipeline(cond, expected) -> None:
    embeds, neg, pooled, neg_pooled = expected
    null = cond.null()
    assert_close(cond.prompt_embeds, embeds)
    assert_close(null.prompt_embeds, neg)
    if pooled is None:
        assert cond.pooled_embeds is None
    else:
        assert_close(cond.pooled_embeds, pooled)
        assert_close(null.pooled_embeds, neg_pooled)


@pytest.mark.parametrize("negative", ["", "black line"])
def test_prompt_encoder_matches_pipeline_encode_prompt(stack, negative):
    cond = stack.encoder.encode(PROMPTS, negative=negative)
    assert stack.encoder.stack == TextStack(stack.name)
    _check_against_pipeline(cond, _pipeline_embeds(stack, negative or None))
    if stack.name == "sdxl":
        size = stack.pipe.default_sample_size * stack.pipe.vae_scale_factor
        ids = stack.pipe._get_add_time_ids((size, size), (0, 0), (size, size), cond.prompt_embeds.dtype,
                                           stack.pipe.text_encoder_2.config.projection_dim)
        assert_close(cond.time_ids, ids.expand(2, -1))
        if negative == "":  # force_zeros_for_empty_prompt
            assert not cond.null().prompt_embeds.any()
    else:
        assert cond.time_ids is None


def test_sd3_without_t5_matches_pipeline(tmp_path):
    path = tiny_stacks.build_tiny_sd3(tmp_path / "sd3_no_t5", with_t5=False)
    # diffusers drops None components on save: a T5-less SD3 loads with them passed explicitly
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    encoder = PromptEncoder.from_pretrained(path, max_sequence_length=8)
    assert not encoder.has_t5
    cond = encoder.encode(PROMPTS)
    expected = pipe.encode_prompt(PROMPTS, None, None, device="cpu", max_sequence_length=8)
    _check_against_pipeline(cond, expected)
    assert cond.prompt_embeds.shape == (2, tiny_stacks.MAX_LENGTH + 8, 64)


# --------------------------------------------------------------------------- (e) DDIM parity
@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_ode_sample_matches_diffusers_ddim_trailing(stacks, scale):
    stack = stacks("sd15")
    noise = torch.randn(2, 4, 8, 8)
    cond = stack.encoder.encode(PROMPTS)
    ours = Teacher(stack.denoiser).sample(noise, cond, steps=4, guidance_scale=scale)

    # the stack's scheduler config (SD's betas, clip_sample=False) as DDIM, trailing, final alpha 1
    scheduler = diffusers.DDIMScheduler.from_config(stack.pipe.scheduler.config, timestep_spacing="trailing",
                                                    set_alpha_to_one=True)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    embeds, neg, _, _ = _pipeline_embeds(stack)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for step in scheduler.timesteps:
            if scale == 1.0:
                eps = stack.pipe.unet(x, step, encoder_hidden_states=embeds).sample
            else:
                u, c = stack.pipe.unet(torch.cat([x, x]), step,
                                       encoder_hidden_states=torch.cat([neg, embeds])).sample.chunk(2)
                eps = u + scale * (c - u)
            x = scheduler.step(eps, step, x).prev_sample
    assert_close(ours, x, atol=1e-4, rtol=1e-4)
