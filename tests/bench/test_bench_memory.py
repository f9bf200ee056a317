"""``stepdistill bench memory``: one child process per experiment writes peak memory and parameter
counts that agree with the algorithm ``stepdistill train`` builds; the generator kind (full, LoRA,
adapters) is read off the built generator; bad arguments are one-line errors."""

import json

import pytest

from stepdistill.bench import memory
from stepdistill.cli import main


def _built(experiment, tmp_path):
    from stepdistill.config import compose_train
    from stepdistill.workflows.train import build_algorithm

    cfg = compose_train([f"experiment={experiment}", f"output_dir={tmp_path}"])
    return build_algorithm(cfg, 0)


def test_suite_files_schema_and_counts(tmp_path, one_thread):
    out = tmp_path / "bench"
    assert main(["bench", "memory", f"output_dir={out}", "dataset=toy2d", "experiments=[toy2d/dmd2]",
                 "iterations=2", "batch_size=64"]) == 0
    data = json.loads((out / "bench_memory.json").read_text())
    assert {"cpu", "torch", "date"} <= set(data["machine"])
    rows = {r["experiment"]: r for r in data["rows"]}
    assert list(rows) == ["toy2d/dmd2"]
    for row in rows.values():
        assert {"experiment", "algorithm", "kind", "trainable_params", "total_params", "trainable_share",
                "peak_rss_mib", "baseline_rss_mib", "imports_rss_mib"} <= set(row)
        assert row["peak_rss_mib"] >= row["baseline_rss_mib"] > row["imports_rss_mib"] > 0
        assert row["kind"] == "full" and row["trainable_share"] == 1.0 and row["batch_size"] == 64
        assert row["steps_run"] >= 2 and set(row["phases_run"]) == set(row["phase_params"])
    dmd2 = rows["toy2d/dmd2"]
    assert dmd2["algorithm"] == "DMD2" and set(dmd2["phases_run"]) == {"critic", "generator"}  # both phases ran
    algorithm = _built("toy2d/dmd2", tmp_path / "direct")
    generator = [p.numel() for p in algorithm.generator.trainable_parameters()]
    assert dmd2["trainable_params"] == dmd2["total_params"] == sum(generator)
    assert dmd2["phase_params"] == {"generator": sum(generator),
                                    "critic": sum(p.numel() for p in algorithm.critic.parameters())}
    assert dmd2["all_phases_trainable"] == sum(dmd2["phase_params"].values())
    table = (out / "bench_memory.md").read_text()
    assert "| toy2d/dmd2 | DMD2 | full |" in table and "peak_rss_mib" in table
    assert (out / "bench_memory.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / memory.WORK).exists()  # the children's run directories are gone


@pytest.mark.parametrize("experiment, kind", [("toy2d/agd", "adapters"), ("tiny_sd/lcm_lora", "lora"),
                                              ("toy2d/sid", "full")])
def test_generator_kind(experiment, kind, tmp_path, one_thread):
    generator = _built(experiment, tmp_path).generator
    assert memory.generator_kind(generator) == kind
    trainable = sum(p.numel() for p in generator.trainable_parameters())
    total = sum(p.numel() for p in generator.parameters())
    assert (0 < trainable < total) if kind != "full" else trainable == total


@pytest.mark.parametrize("argv, message", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["experiments=[toy2d/nope]"], "unknown experiment 'toy2d/nope'"),
    (["iterations=0"], "iterations must be >= 1"),
    (["jobs=0"], "jobs must be >= 1"),
    (["dataset=mnist"], "unknown dataset 'mnist'"),
])
def test_bad_arguments_are_one_line(argv, message, tmp_path, capsys):
    assert main(["bench", "memory", f"output_dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["bench", "memory", "dataset=toy2d"]) == 2
    assert "output_dir is required" in capsys.readouterr().err
