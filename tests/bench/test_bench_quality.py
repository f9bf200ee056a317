"""`stepdistill bench quality`: toy2d/dmd2 and toy2d/lcm under the same tiny budget, the teacher curve,
the files, resuming, the budget's schedule scaling and the CLI's one-line errors."""

import json
import math

import pytest

from stepdistill.bench import quality
from stepdistill.bench.budget import fit_to_budget, scale_stages
from stepdistill.cli import main

SCHEMA = {"dataset", "experiment", "algorithm", "metric", "value", "teacher_value", "ratio", "steps", "nfe",
          "iterations", "wall_s", "budget_s"}
ARGS = ["dataset=toy2d", "experiments=[toy2d/dmd2,lcm]", "budget_s=2", "teacher_steps=[1,2]", "num_samples=256",
        "probe_iterations=6", "batch_size=64"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench_quality")
    return out, quality.run([f"output_dir={out}", *ARGS])


def test_rows_budget_and_ratio(suite):
    out, payload = suite
    rows = payload["rows"]
    assert [r["experiment"] for r in rows] == ["toy2d/dmd2", "toy2d/lcm"]
    assert [r["algorithm"] for r in rows] == ["DMD2", "ConsistencyDistillation"]
    for r in rows:
        assert SCHEMA <= set(r)
        assert r["dataset"] == "toy2d" and r["metric"] == "swd"
        assert r["budget_s"] == 2.0 and r["iterations"] > 0 and r["wall_s"] > 0
        # the probe's plan, cut short if the run reaches the budget first (trainer.max_wall_s)
        assert 0 < r["iterations"] <= max(1, math.floor(2.0 / r["s_per_it"]))
        assert r["ratio"] == r["value"] / r["teacher_value"]
        assert r["nfe"] == r["steps"]  # the toy2d teacher runs without CFG: one pass per step
        run = out / "runs" / r["experiment"].replace("/", "_")
        assert json.loads((run / "train.json").read_text())["iterations"] == r["iterations"]
        config = (run / "config.yaml").read_text()
        assert f"max_steps: {max(1, math.floor(2.0 / r['s_per_it']))}" in config and "max_wall_s: 2.0" in config
        assert (run / "metrics.json").is_file() and (run / "student").is_dir()
    assert [r["steps"] for r in rows] == [1, 4]
    assert rows[0]["teacher_value"] == rows[1]["teacher_value"]  # one teacher, same samples and code
    assert payload["budget_s"] == {"toy2d": 2.0}


def test_teacher_curve_and_files(suite):
    out, payload = suite
    curve = payload["teacher_curves"]["toy2d"]
    assert curve["metric"] == "swd" and curve["guidance_scale"] == 1.0 and curve["num_samples"] == 256
    assert [(p["steps"], p["nfe"]) for p in curve["points"]] == [(1, 1), (2, 2)]
    assert all(math.isfinite(p["value"]) and p["value"] > 0 for p in curve["points"])
    assert json.loads((out / "bench_quality.json").read_text())["rows"] == payload["rows"]
    assert "date" in payload["machine"]
    md = (out / "bench_quality.md").read_text()
    assert "toy2d/dmd2" in md and "toy2d/lcm" in md and "teacher swd vs steps" in md
    assert (out / "bench_quality.png").stat().st_size > 0


def test_resume_reuses_finished_runs(suite):
    out, payload = suite
    train_json = out / "runs" / "toy2d_dmd2" / "train.json"
    before = train_json.stat().st_mtime_ns
    again = quality.run([f"output_dir={out}", *ARGS, "resume=true"])
    assert again["rows"] == payload["rows"]
    assert train_json.stat().st_mtime_ns == before


def test_fit_to_budget_scales_tscd_stages():
    from stepdistill.config import compose_train

    cfg = compose_train(["experiment=digits/tscd", "output_dir=unused"])
    changed = fit_to_budget(cfg, 300)  # configured: 3,000 iterations, stages of 400
    assert cfg.trainer.max_steps == 300 and list(cfg.algorithm.stage_steps) == [40, 40, 40]
    assert cfg.trainer.checkpoint_every == 0 and cfg.trainer.sample_every == 0
    assert changed["trainer.max_steps"] == (3000, 300)
    assert scale_stages([750, 750, 750], 3000, 2) == [0, 1, 0]


def test_default_experiments_skip_variants():
    plan = quality.plan_experiments(None, None)
    assert "toy2d/sid_4step" not in plan["toy2d"] and "toy2d/dmd2" in plan["toy2d"]
    assert "digits/dmd2_long" not in plan["digits"] and "digits/tscd" in plan["digits"]
    assert quality.plan_experiments(None, ["lcm"]) == {"toy2d": ["toy2d/lcm"], "digits": ["digits/lcm"]}


@pytest.mark.parametrize("args, message", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["experiments=[toy2d/nope]"], "unknown experiment 'toy2d/nope'"),
    (["dataset=mnist"], "unknown dataset 'mnist'"),
    (["budget_s=-1"], "budget_s must be > 0"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    assert main(["bench", "quality", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("stepdistill: error:") and message in err
    assert not (tmp_path / "runs").exists()
