"""Loading teachers from local directories: layouts, and one-line errors for bad paths and files."""

import shutil

import pytest
import torch

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.diffusers import UNet2DDenoiser
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.teachers import build_ddpm_scheduler, build_digits_unet


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    build_digits_unet((8, 16), 1, num_classes=3, norm_groups=4).save_pretrained(root / "unet")
    build_ddpm_scheduler(prediction_type="v_prediction").save_pretrained(root / "scheduler")
    return root


def _out(denoiser):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return denoiser(x, torch.tensor([0.3, 0.8]), Conditioning.labels(torch.tensor([0, 2]), 3))


def test_pipeline_dir_and_single_model_dir_load_the_same(teacher_dir):
    whole, single = load_denoiser(teacher_dir), load_denoiser(teacher_dir / "unet")
    assert isinstance(whole, UNet2DDenoiser) and whole.prediction.value == "v"
    torch.testing.assert_close(_out(whole), _out(single))


def test_scheduler_config_beside_the_model(teacher_dir, tmp_path):
    shutil.copytree(teacher_dir / "unet", tmp_path / "m")
    with pytest.raises(StepdistillError, match="no scheduler config"):
        load_denoiser(tmp_path / "m")
    shutil.copy(teacher_dir / "scheduler" / "scheduler_config.json", tmp_path / "m")
    torch.testing.assert_close(_out(load_denoiser(tmp_path / "m")), _out(load_denoiser(teacher_dir)))


def test_corrupt_weights_are_a_clear_error(teacher_dir, tmp_path):
    shutil.copytree(teacher_dir, tmp_path / "t")
    (tmp_path / "t" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StepdistillError, match="corrupt or incomplete"):
        load_denoiser(tmp_path / "t")


@pytest.mark.parametrize("path,message", [
    ("org/some-model", "looks like a model-hub id"),
    ("/definitely/not/here", "teacher directory not found"),
])
def test_bad_paths(path, message):
    with pytest.raises(StepdistillError, match=message):
        load_denoiser(path)


def test_unsupported_backbone_and_empty_dir(tmp_path):
    with pytest.raises(StepdistillError, match="no model found"):
        load_denoiser(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "VQModel"}')
    with pytest.raises(StepdistillError, match="unsupported backbone 'VQModel'"):
        load_denoiser(tmp_path)


def test_save_denoiser_round_trips_with_the_teachers_scheduler(teacher_dir, tmp_path):
    from stepdistill.denoisers.loading import save_denoiser

    original = load_denoiser(teacher_dir)
    save_denoiser(original, tmp_path / "copy")
    again = load_denoiser(tmp_path / "copy")
    assert again.scheduler_config == original.scheduler_config
    torch.testing.assert_close(_out(again), _out(original))
