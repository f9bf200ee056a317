import json

import pytest

from stepdistill.cli import main


@pytest.fixture()
def train_toy2d(tmp_path, monkeypatch):
    """``train_toy2d(experiment) -> (run_dir, metrics.json)``: a full `stepdistill train` run in a fresh
    cache, evaluated against the teacher at 100 steps."""
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path / "cache"))

    def run(experiment: str):
        out = tmp_path / "run"
        assert main(["train", f"experiment={experiment}", f"output_dir={out}", "trainer.progress=false",
                     "evaluate.teacher_steps=100"]) == 0
        return out, json.loads((out / "metrics.json").read_text())

    return run
