"""Text-to-image SiD (from prompts alone) and f-distill (with captioned real images) on the tiny SD1.5
stack: the experiments train and sample, and captioned images become the teacher VAE's latents."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from stepdistill.cli import main
from stepdistill.config import ASSETS_DIR
from stepdistill.data.images import ImageCaptionData
from stepdistill.errors import StepdistillError
from stepdistill.eval.tasks import PromptTask
from stepdistill.tiny_stacks import tiny_stack_dir
from stepdistill.training.trainer import TaskBatches

SHAPES = ASSETS_DIR / "shapes_images"


@pytest.fixture(scope="module")
def sd15_teacher(one_thread):
    return tiny_stack_dir("sd15")


def test_shipped_shapes_images_load_as_pixels_in_range():
    data = ImageCaptionData(str(SHAPES), resolution=16)
    images = torch.stack([data.image(i) for i in range(len(data))])
    assert len(data) == 32 and images.shape == (32, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
    assert data.prompts[0] == "a red circle"
    red = images[0]  # a red circle at the centre: red channel high, blue low
    assert red[0, 8, 8] > 0.5 and red[2, 8, 8] < -0.3
    prompts, pixels = data.draw(5, torch.Generator().manual_seed(1))
    again, pixels2 = data.draw(5, torch.Generator().manual_seed(1))
    assert prompts == again and torch.equal(pixels, pixels2)
    for p, x in zip(prompts, pixels, strict=True):  # every image travels with its own caption
        assert any(torch.equal(x, img) for q, img in zip(data.prompts, images, strict=True) if q == p)


def test_image_folder_errors(tmp_path):
    with pytest.raises(StepdistillError, match="no metadata.jsonl"):
        ImageCaptionData(str(tmp_path), resolution=16)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n')
    with pytest.raises(StepdistillError, match="image listed in metadata.jsonl not found"):
        ImageCaptionData(str(tmp_path), resolution=16)
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(StepdistillError, match="cannot read image"):
        ImageCaptionData(str(tmp_path), resolution=16).image(0)
    with pytest.raises(StepdistillError, match="has no rows with keys 'caption'"):
        ImageCaptionData(str(tmp_path), resolution=16, caption_column="caption")


def test_image_batches_are_the_vae_latents_of_the_drawn_images(sd15_teacher):
    data = ImageCaptionData(str(SHAPES), resolution=16)
    batches = TaskBatches(PromptTask(data, str(sd15_teacher)), seed=2)
    batch = batches(4, 6)
    share = batches(4, 6, slice(2, 5))  # a process's rows: only they are read and encoded
    torch.testing.assert_close(share.x0, batch.x0[2:5])
    torch.testing.assert_close(share.cond.prompt_embeds, batch.cond.prompt_embeds[2:5])
    assert batch.cond.prompt_embeds.shape[0] == 6 and batch.x0.shape == (6, 4, 8, 8)
    _, pixels = data.draw(6, torch.Generator().manual_seed(2 * 1_000_033 + 7919 * 4 + 1))
    vae = AutoencoderKL.from_pretrained(sd15_teacher / "vae")
    expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(batch.x0, expected)


def test_images_at_the_wrong_resolution_are_a_one_line_error(sd15_teacher):
    with pytest.raises(StepdistillError, match="data.resolution=32 but .* works on 16-pixel images: "
                                               "set data.resolution=16"):
        PromptTask(ImageCaptionData(str(SHAPES), resolution=32), str(sd15_teacher))


@pytest.mark.parametrize("experiment,phase_keys", [
    ("tiny_sd/sid", {"sid_loss"}),
    ("tiny_sd/fdistill", {"dm_loss", "ratio_mean", "gan_generator_loss"}),
])
def test_text_experiments_train_and_sample(experiment, phase_keys, sd15_teacher, tmp_path):
    run = tmp_path / "run"
    assert main(["train", f"experiment={experiment}", f"output_dir={run}", "trainer.max_steps=12",
                 "trainer.batch_size=4", "trainer.checkpoint_every=0", "trainer.progress=false"]) == 0
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    generator_logs = [r for r in logs if r["phase"] == "generator"]
    assert generator_logs and phase_keys <= set(generator_logs[-1])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    if experiment == "tiny_sd/fdistill":  # the discriminator trained on real latents in the critic phase
        assert "gan_critic_loss" in [r for r in logs if r["phase"] == "critic"][-1]
    assert main(["sample", f"run={run}", "prompt=a red circle", "num_images=2", f"out={tmp_path / 's'}"]) == 0
    assert (tmp_path / "s" / "grid.png").stat().st_size > 0


def test_fdistill_on_prompts_alone_is_a_one_line_error(sd15_teacher, tmp_path, capsys):
    assert main(["train", "experiment=sd15/fdistill", f"teacher.path={sd15_teacher}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.folder is required" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
