"""CLIP score: torchmetrics' CLIPScore over a local tiny random CLIP equals the direct computation
(mean of 100 x cosine of the projected embeddings, clipped at 0); the CLI end to end; one-line errors."""

import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.errors import StepdistillError
from stepdistill.eval.clip_score import (
    Clip,
    clip_pair_scores,
    clip_score,
    direct_clip_score,
    load_clip,
    score_image_dir,
)

PROMPTS = ["a red circle", "a blue square", "two green stars on a big white ring with the digit seven",
           "a black line", "zero"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, one_thread):
    """A tiny random CLIP (hidden 32, 2 layers, 32x32 images, 8x8 patches) saved like a real one."""
    from stepdistill.tiny_stacks import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


def _images(n=5, seed=1):
    return torch.randint(0, 256, (n, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_torchmetrics_equals_direct(clip):
    images = _images()
    pairs = clip_pair_scores(images, PROMPTS, clip)
    assert pairs.shape == (5,) and (pairs.abs() <= 100).all()
    assert (pairs < 0).any() and (pairs > 0).any()  # a random CLIP: both signs among the pairs
    tm = clip_score(images, PROMPTS, clip, batch_size=2, progress=False)
    direct = direct_clip_score(images, PROMPTS, clip, batch_size=3)
    assert direct == pytest.approx(max(float(pairs.mean()), 0.0), abs=1e-5)
    assert tm == pytest.approx(direct, abs=1e-5)
    # float [0, 1] images score as their uint8 rounding; PIL images as their pixels
    assert clip_score(images.float() / 255, PROMPTS, clip, progress=False) == pytest.approx(tm, abs=1e-5)
    from PIL import Image

    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    assert clip_score(pil, PROMPTS, clip, progress=False) == pytest.approx(tm, abs=1e-5)


def test_clipped_at_zero(clip):
    """Negating the visual projection negates every cosine: the side with a negative mean is 0 in
    both computations (torchmetrics clips the mean over pairs, not each pair)."""
    images = _images()
    model = clip.model
    flipped = type(model)(model.config).eval()
    flipped.load_state_dict(model.state_dict())
    with torch.no_grad():
        flipped.visual_projection.weight.neg_()
    negated = Clip(flipped, clip.processor)
    pairs = clip_pair_scores(images, PROMPTS, clip)
    assert clip_pair_scores(images, PROMPTS, negated) == pytest.approx(-pairs, abs=1e-9)
    for c, mean in ((clip, float(pairs.mean())), (negated, -float(pairs.mean()))):
        tm = clip_score(images, PROMPTS, c, progress=False)
        assert tm == pytest.approx(direct_clip_score(images, PROMPTS, c), abs=1e-5)
        assert tm == pytest.approx(max(mean, 0.0), abs=1e-5)
    assert min(clip_score(images, PROMPTS, c, progress=False) for c in (clip, negated)) == 0.0


def test_cli_end_to_end(clip_dir, clip, tmp_path, capsys):
    from PIL import Image

    images = _images(4, seed=2)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    out = tmp_path / "res" / "clip.json"
    assert main(["eval-clip", f"images={folder}", f"prompts={prompts}", f"clip={clip_dir}", f"out={out}",
                 "batch_size=3"]) == 0
    record = json.loads(out.read_text())
    assert set(record) == {"clip_score", "n", "clip"} and record["n"] == 4
    assert record["clip_score"] == pytest.approx(direct_clip_score(images, PROMPTS[:4], clip), abs=1e-5)
    assert json.loads(capsys.readouterr().out) == record
    # a `stepdistill sample` directory: samples.json gives the files (not grid.png) and their prompts
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(folder / "grid.png")
    order = ["0003.png", "0001.png"]
    (folder / "samples.json").write_text(json.dumps({"files": order, "prompts": ["a red circle", "zero"]}))
    scored = score_image_dir(folder, None, clip, progress=False)
    assert scored["n"] == 2
    assert scored["clip_score"] == pytest.approx(
        direct_clip_score(images[[3, 1]], ["a red circle", "zero"], clip), abs=1e-5)


@pytest.mark.parametrize("clip_arg, message", [
    ("{tmp}/nowhere", "CLIP directory not found"),
    ("openai/clip-vit-large-patch14", "hub id"),
    ("{tmp}", "holds no CLIP model"),
    ("{tmp}/config_only", "cannot load the CLIP model or processor"),
])
def test_bad_clip_is_one_line(clip_arg, message, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_images(1)[0].permute(1, 2, 0).numpy()).save(folder / "0.png")
    (tmp_path / "p.txt").write_text("a\n")
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text('{"model_type": "clip"}')
    code = main(["eval-clip", f"images={folder}", f"prompts={tmp_path / 'p.txt'}", f"clip={clip_arg.format(tmp=tmp_path)}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_mismatched_counts_and_bad_inputs(clip_dir, clip, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(_images(3)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\nzero\n")
    assert main(["eval-clip", f"images={folder}", f"prompts={prompts}", f"clip={clip_dir}"]) == 2
    err = capsys.readouterr().err
    assert "3 images" in err and "2 prompts" in err and err.count("\n") == 1
    for argv, message in ([f"images={tmp_path / 'none'}", f"prompts={prompts}"], "images directory not found"), \
                         ([f"images={folder}", f"prompts={tmp_path / 'none.txt'}"], "prompts file not found"), \
                         ([f"images={folder}"], "prompts=FILE is required"), \
                         ([f"images={folder}", "bogus=1"], "unknown key 'bogus'"):
        assert main(["eval-clip", *argv, f"clip={clip_dir}"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(StepdistillError, match="2 prompts"):
        clip_score(_images(3), ["a", "b"], clip, progress=False)
    with pytest.raises(StepdistillError, match=r"in \[0, 1\]"):
        clip_score(_images(2).float(), ["a", "b"], clip, progress=False)
