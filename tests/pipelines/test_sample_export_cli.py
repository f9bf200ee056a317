"""`stepdistill sample` / `stepdistill export` on fake run directories (config.yaml + student/)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_run

from stepdistill.cli import main
from stepdistill.conditioning import Conditioning
from stepdistill.pipelines import FewStepPipeline, pixels_to_unit, sample_student


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, class_student):
    return make_run(tmp_path_factory.mktemp("runs") / "class_run", class_student, None)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, text_student, sd15_dir):
    return make_run(tmp_path_factory.mktemp("runs") / "text_run", text_student, sd15_dir)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_class_run_writes_the_students_samples(class_run, class_student):
    out = class_run / "samples"
    out.mkdir()
    (out / "step-000100.png").write_text("the trainer's grid")
    assert main(["sample", f"run={class_run}", "steps=2", "num_images=6", "seed=1"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["labels"] == [0, 1, 2, 0, 1, 2] and record["timesteps"] == [999, 499]
    assert record["files"] == [f"{i:04d}.png" for i in range(6)]
    x0 = sample_student(class_student, Conditioning(class_labels=torch.tensor(record["labels"])), 6, 2, seed=1)
    expected = (pixels_to_unit(x0)[:, 0] * 255).round().to(torch.uint8).numpy()
    got = np.stack([_png(out / name) for name in record["files"]])
    assert np.array_equal(got, expected)
    assert _png(out / "grid.png").shape[1] > 3 * 64  # three class columns, upscaled tiles

    # a second call replaces its own earlier files (no overwrite=true needed), and nothing else
    assert main(["sample", f"run={class_run}", "num_images=2", "labels=[2]"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["steps"] == 4 and record["labels"] == [2, 2]  # steps from config.yaml's generator.steps
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png", "samples.json",
                                                     "step-000100.png"]
    assert (out / "step-000100.png").read_text() == "the trainer's grid"


def test_sample_text_run_equals_the_pipeline(text_run, tmp_path):
    out = tmp_path / "text_samples"
    assert main(["sample", f"run={text_run}", "steps=1", "num_images=3", "seed=4", "prompt=a red circle",
                 f"out={out}"]) == 0
    pipe = FewStepPipeline.from_run(text_run)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red circle"] * 3, num_inference_steps=1, generator=torch.Generator().manual_seed(4)).images
    for i, image in enumerate(images):
        assert np.array_equal(_png(out / f"{i:04d}.png"), np.asarray(image))
    assert json.loads((out / "samples.json").read_text())["prompts"] == ["a red circle"] * 3


BAD = {
    "missing run": (["sample", "run={tmp}/nope"], "run directory not found"),
    "no run": (["sample", "steps=1"], "run=DIR is required"),
    "run without student": (["sample", "run={tmp}"], "has no student/ directory"),
    "unknown key": (["sample", "run={class_run}", "stpes=2"], "unknown key 'stpes' for `stepdistill sample`"),
    "bad int": (["sample", "run={class_run}", "steps=two"], "steps='two' is not a valid int"),
    "bad label": (["sample", "run={class_run}", "labels=[7]", "out={tmp}/o"], "labels [7] out of range"),
    "no prompt": (["sample", "run={text_run}", "out={tmp}/o"], "needs prompts: pass prompt="),
    "clashing out": (["sample", "run={class_run}", "out={tmp}/full"], "already holds 0000.png"),
    "export missing run": (["export", "run={tmp}/nope", "format=diffusers"], "run directory not found"),
    "export no student": (["export", "run={tmp}", "format=diffusers"], "has no student/ directory"),
    "unknown format": (["export", "run={class_run}", "format=onnx"], "unknown format 'onnx'; allowed: diffusers, lora"),
    "lora without adapters": (["export", "run={class_run}", "format=lora"], "has no LoRA student"),
    "export non-empty out": (["export", "run={class_run}", "out={tmp}/full"], "already exists and is not empty"),
    "export foreign out": (["export", "run={class_run}", "out={tmp}/full", "overwrite=true"], "did not write"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, class_run, text_run, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "0000.png").write_text("x")
    args, message = BAD[case]
    args = [a.format(tmp=tmp_path, class_run=class_run, text_run=text_run) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["0000.png"]


def test_export_cli_then_overwrite(class_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", f"run={class_run}", "format=diffusers", f"out={out}", "steps=2"]) == 0
    assert json.loads((out / "stepdistill_export.json").read_text())["steps"] == 2
    assert main(["export", f"run={class_run}", f"out={out}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert main(["export", f"run={class_run}", f"out={out}", "overwrite=true"]) == 0
    assert json.loads((out / "stepdistill_export.json").read_text())["steps"] == 4
    assert main(["export", f"run={class_run}"]) == 0
    assert (class_run / "export" / "diffusers" / "unet" / "config.json").is_file()


def test_sample_overwrite_replaces_clashing_files_only(class_run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "0000.png").write_text("old")
    (out / "keep.txt").write_text("keep")
    assert main(["sample", f"run={class_run}", "num_images=1", "steps=1", f"out={out}", "overwrite=true"]) == 0
    assert _png(out / "0000.png").shape == (8, 8) and (out / "keep.txt").read_text() == "keep"
