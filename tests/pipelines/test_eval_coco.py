"""COCO protocols on a tiny text student: captions -> images -> FID (Inception, offline) + CLIP score;
the caption selection, the resumable generation, the shipped protocol configs, one-line errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_run

from stepdistill.cli import main
from stepdistill.commands.eval_coco import load_protocol, protocols
from stepdistill.errors import StepdistillError
from stepdistill.eval.coco import CocoProtocol, evaluate_coco, generate_images, select_pairs

CAPTIONS = ["a red circle", "a blue square", "a green star", "a black ring", "two white lines"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO-like folder: 5 images of different sizes, two captions each (the lower id first)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val").mkdir()
    g = np.random.default_rng(0)
    images, annotations = [], []
    for i, caption in enumerate(CAPTIONS):
        name = f"COCO_val_{i:012d}.jpg"
        Image.fromarray(g.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)).save(root / "val" / name)
        images.append({"id": 100 + i, "file_name": name})
        annotations += [{"id": 50 - i, "image_id": 100 + i, "caption": f" {caption} "},
                        {"id": 90 + i, "image_id": 100 + i, "caption": "a later caption"}]
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from stepdistill.tiny_stacks import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, sd15_dir, text_student):
    return make_run(tmp_path_factory.mktemp("runs") / "tsd", text_student, sd15_dir)


def _protocol(coco, **kw):
    values = dict(name="coco_test", captions=str(coco / "captions.json"), images=str(coco / "val"),
                  num_images=4, eval_resolution=32, generate_resolution=32)
    return CocoProtocol(**{**values, **kw})


def test_pairs_are_a_seeded_sample_with_first_captions(coco):
    pairs = select_pairs(_protocol(coco, num_images=3))
    assert len(pairs) == 3 and pairs == select_pairs(_protocol(coco, num_images=3))
    assert all(caption in CAPTIONS for _, caption in pairs)  # the first caption (lower id), stripped
    assert [p.name for p, _ in pairs] == sorted(p.name for p, _ in pairs)
    assert [c for _, c in select_pairs(_protocol(coco, num_images=None))] == CAPTIONS
    with pytest.raises(StepdistillError, match="asks for 6 images but .* captions 5"):
        select_pairs(_protocol(coco, num_images=6))


def test_shipped_protocols_bind():
    assert protocols() == ["coco2014_30k", "coco2017_10k", "coco2017_5k"]
    p = load_protocol("coco2014_30k", {"captions": "c.json"})
    assert (p.num_images, p.generate_resolution, p.eval_resolution, p.captions) == (30000, 512, 256, "c.json")
    assert load_protocol("coco2017_5k", {}).num_images == 5000
    with pytest.raises(StepdistillError, match="unknown protocol 'coco'; allowed: coco2014_30k"):
        load_protocol("coco", {})


def test_evaluate_coco_end_to_end_and_resume(coco, clip_dir, text_run):
    from stepdistill.eval.clip_score import direct_clip_score

    protocol = _protocol(coco)
    metrics = evaluate_coco(text_run, protocol, clip_dir=str(clip_dir), batch_size=3, progress=False)
    out = text_run / "eval" / "coco_test"
    assert json.loads((out / "coco_metrics.json").read_text()) == metrics
    files = sorted((out / "images").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(4)]
    assert all(Image.open(f).size == (32, 32) for f in files)
    assert metrics["student_resolution"] == 16 and metrics["steps"] == text_run_steps(text_run)
    assert metrics["fid_details"]["n_real"] == metrics["fid_details"]["n_fake"] == 4
    assert metrics["fid_details"]["feature"] == "inception" and np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    prompts = [c for _, c in select_pairs(protocol)]
    assert metrics["clip_score"] == pytest.approx(direct_clip_score(images, prompts, clip_dir), abs=1e-4)
    # a second evaluation generates nothing and gives the same numbers
    before = [f.stat().st_mtime_ns for f in files]
    student = _student(text_run)
    assert generate_images(student, prompts, out / "images", size=32, batch_size=3, progress=False)[1] == 0
    again = evaluate_coco(text_run, protocol, clip_dir=str(clip_dir), batch_size=3, progress=False)
    assert again["fid"] == pytest.approx(metrics["fid"]) and [f.stat().st_mtime_ns for f in files] == before


def text_run_steps(run):
    return _student(run).generator.steps


def _student(run):
    from stepdistill.pipelines.runs import load_run

    return load_run(run)


def test_cli_errors_are_one_line(coco, text_run, capsys):
    cases = [["run=" + str(text_run), "protocol=coco"],
             ["run=" + str(text_run), "protocol=coco2017_5k"],
             ["run=" + str(text_run), "protocol=coco2017_5k", f"captions={coco / 'nope.json'}", f"images={coco}"],
             ["run=" + str(text_run), "protocol=coco2017_5k", f"captions={coco / 'captions.json'}",
              f"images={coco / 'val'}"],
             ["protocol=coco2017_5k", "captoins=x"]]
    for args in cases:
        assert main(["eval-coco", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(cases)
    assert "unknown protocol 'coco'" in err[0]
    assert "needs captions=PATH" in err[1]
    assert "captions file not found" in err[2]
    assert "asks for 5000 images but" in err[3]
    assert "unknown key 'captoins'" in err[4]
    assert not (text_run / "eval" / "coco2017_5k").exists()
