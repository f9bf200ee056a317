"""The guidance embedding (LCM's w embedding): diffusers' features, the native UNet2DConditionModel
path the SD pipelines drive, and a save / load round trip for the backbones diffusers does not know."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.diffusers import UNet2DConditionDenoiser, UNet2DDenoiser
from stepdistill.denoisers.guidance_embedding import (
    add_guidance_embedding,
    embedding_dim,
    guidance_scale_embedding,
)
from stepdistill.denoisers.loading import load_denoiser, save_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.schedules import NoiseSchedule, Prediction
from stepdistill.teachers import build_digits_unet
from stepdistill.tiny_stacks import sd15_components


@pytest.mark.parametrize("dim", [16, 17, 256])
def test_features_equal_the_sd_pipelines(dim):
    scale = torch.tensor([1.0, 1.5, 4.0, 9.0])
    ours = guidance_scale_embedding(scale, dim)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, scale - 1, embedding_dim=dim)
    torch.testing.assert_close(ours, theirs)


def test_a_text_unet_takes_the_scale_like_diffusers_lcm_unets(tmp_path):
    """Our guided call equals UNet2DConditionModel's own ``timestep_cond`` path (what the SD pipelines
    fill from guidance_scale), and diffusers reloads the student with its projection."""
    unet = sd15_components()["unet"]
    add_guidance_embedding(unet, 32)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)
    denoiser = UNet2DConditionDenoiser(unet, NoiseSchedule.vp(), Prediction.EPS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *denoiser.sample_shape, generator=g)
    embeds = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    cond = Conditioning(prompt_embeds=embeds).with_guidance(torch.tensor([2.0, 6.0]))
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    with torch.no_grad():
        ours = denoiser(x, t, cond, out=Prediction.EPS)
        w_emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([1.0, 5.0]), embedding_dim=32)
        theirs = unet(x, denoiser.model_time(t, x), encoder_hidden_states=embeds, timestep_cond=w_emb).sample
        torch.testing.assert_close(ours, theirs)
        unet.save_pretrained(tmp_path)
        again = UNet2DConditionModel.from_pretrained(tmp_path)
        assert again.config.time_cond_proj_dim == 32
        torch.testing.assert_close(again(x, denoiser.model_time(t, x), encoder_hidden_states=embeds,
                                         timestep_cond=w_emb).sample, theirs)


def test_class_unet_embedding_survives_save_and_load(tmp_path):
    unet = build_digits_unet((8, 16), 1, num_classes=3, norm_groups=4)
    schedule = NoiseSchedule.vp("linear", 1000, 1e-4, 0.02)
    denoiser = UNet2DDenoiser(unet, schedule, Prediction.EPS)
    add_guidance_embedding(unet, 16)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight)
    cond = Conditioning.labels(torch.tensor([0, 1]), 3).with_guidance(torch.tensor([1.0, 3.0]))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.7], dtype=torch.float64)
    with pytest.raises(ValueError, match="with_guidance"):
        denoiser(x, t, Conditioning.labels(torch.tensor([0, 1]), 3))
    save_denoiser(denoiser, tmp_path / "student")
    loaded = load_denoiser(tmp_path / "student")
    assert embedding_dim(loaded.backbone) == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), denoiser(x, t, cond))
    # a config that declares the embedding without its weights is an incomplete checkpoint
    plain = UNet2DDenoiser(build_digits_unet((8, 16), 1, num_classes=3, norm_groups=4), schedule, Prediction.EPS)
    save_denoiser(plain, tmp_path / "broken")
    broken = tmp_path / "broken" / "unet" / "config.json"
    broken.write_text(json.dumps({**json.loads(broken.read_text()), "time_cond_proj_dim": 16}))
    with pytest.raises(StepdistillError, match="incomplete"):
        load_denoiser(tmp_path / "broken")
