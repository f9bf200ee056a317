"""AGD's training data: a missing `trajectories` node, or one given to another algorithm, is a one-line
error with a non-zero exit, and nothing is written."""

import pytest
from omegaconf import OmegaConf

from stepdistill.cli import main
from stepdistill.config import compose_train
from stepdistill.errors import StepdistillError
from stepdistill.workflows.train import train


def test_agd_without_trajectories_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "experiment=toy2d/agd", f"output_dir={out}", "trajectories=null"]) == 2
    assert "AGD trains on the teacher's guided trajectories" in capsys.readouterr().err
    assert not out.exists()


def test_trajectories_for_another_algorithm_are_refused(tmp_path):
    cfg = compose_train(["experiment=toy2d/dmd2", f"output_dir={tmp_path / 'run'}"])
    cfg.trajectories = OmegaConf.create({"_target_": "stepdistill.data.trajectories.TrajectorySettings",
                                         "path": str(tmp_path / "t")})
    with pytest.raises(StepdistillError, match="`trajectories` is for AGD"):
        train(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "t").exists()
