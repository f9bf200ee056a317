"""The command line: bad input gives one line and exit 2; teacher train/eval write what they promise."""

import json
import os
import subprocess
import sys

import pytest

from stepdistill.cli import main

BAD_INPUTS = {
    "unknown dataset": (["teacher", "eval", "dataset=imagenet", "output_dir={tmp}/o"], "unknown dataset 'imagenet'; allowed: digits, toy2d"),
    "missing teacher dir": (["teacher", "eval", "teacher.path={tmp}/nope", "output_dir={tmp}/o"], "teacher directory not found"),
    "hub id": (["teacher", "eval", "teacher.path=runwayml/stable-diffusion-v1-5", "output_dir={tmp}/o"], "looks like a model-hub id"),
    "misspelt key": (["teacher", "train", "train.stpes=3", "output_dir={tmp}/o"], "unknown config key 'train.stpes'"),
    "bad data value": (["teacher", "train", "dataset=toy2d", "data.classes=9", "output_dir={tmp}/o"], "data.classes is 9 but data.modes is 8"),
    "unknown command": (["teahcer", "train"], "unknown command 'teahcer train'"),
    "no output dir": (["teacher", "train", "dataset=toy2d"], "output_dir is required"),
    "renamed key": (["teacher", "eval", "dataset=toy2d", "guidance_scale=2", "output_dir={tmp}/o"],
                    "guidance_scale was renamed teacher.guidance_scale: write teacher.guidance_scale=2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys):
    args, message = BAD_INPUTS[case]
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_bad_input_in_a_fresh_process_has_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "stepdistill.cli", "teacher", "eval", "dataset=nope",
                           f"output_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("stepdistill: error: unknown dataset")


def test_teacher_train_then_eval_toy2d(tmp_path, capsys):
    out = tmp_path / "teacher"
    assert main(["teacher", "train", "dataset=toy2d", "train.steps=30", "train.batch_size=64",
                 "data.modes=3", "data.classes=3", "data.radius=3.0", f"output_dir={out}"]) == 0
    assert (out / "denoiser" / "config.json").is_file() and (out / "scheduler" / "scheduler_config.json").is_file()
    assert json.loads((out / "training.json").read_text())["steps"] == 30
    # a second train into the same directory must not overwrite the teacher
    weights = (out / "denoiser" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["teacher", "train", "dataset=toy2d", f"output_dir={out}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err
    assert (out / "denoiser" / "diffusion_pytorch_model.safetensors").read_bytes() == weights

    ev = tmp_path / "eval"
    assert main(["teacher", "eval", "dataset=toy2d", "data.modes=3", "data.classes=3", "data.radius=3.0",
                 f"teacher.path={out}", "steps=[1,2]", "task.num_eval=300", f"output_dir={ev}"]) == 0
    result = json.loads((ev / "teacher_metrics.json").read_text())
    assert result["dataset"] == "toy2d" and [r["steps"] for r in result["rows"]] == [1, 2]
    assert [r["nfe"] for r in result["rows"]] == [1, 2]
    assert set(result["rows"][0]["metrics"]) == {"swd", "mmd", "mode_coverage", "class_accuracy"}
    assert result["reference"]["mode_coverage"] == 1.0
    for name in ("teacher_metrics.md", "teacher_swd_vs_nfe.png", "teacher_samples.png"):
        assert (ev / name).stat().st_size > 0
