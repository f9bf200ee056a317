import json

import pytest

from stepdistill.cli import main


@pytest.fixture()
def train_toy2d(tmp_path, monkeypatch):
    """``train_toy2d(experiment, *overrides, name="run") -> (run_dir, metrics.json)``: a full
    `stepdistill train` run in ``tmp_path/name``, evaluated against the teacher at 100 steps; the runs
    of one test share a fresh cache (the teacher's row is computed once)."""
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))

    def run(experiment: str, *overrides: str, name: str = "run"):
        out = tmp_path / name
        assert main(["train", f"experiment={experiment}", f"output_dir={out}", "trainer.progress=false",
                     "evaluate.teacher_steps=100", *overrides]) == 0
        return out, json.loads((out / "metrics.json").read_text())

    return run
