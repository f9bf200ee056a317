"""``stepdistill bench speed``: teacher and student rows on one batch, honest NFE accounting (CFG is
two network evaluations per sample), ratios that follow from the rows, and the files a suite writes."""

import json

import pytest

from stepdistill.bench import speed
from stepdistill.bench.timing import Timed, time_interleaved
from stepdistill.cli import main

TINY = ["dataset=toy2d", "batch_size=16", "steps=[1,2]", "student_steps=[1,2]", "experiments=[dmd2,agd]",
        "repeats=1", "reference_steps=2", "min_time_s=0"]


@pytest.fixture(scope="module")
def result(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("speed")
    return out, speed.run([f"output_dir={out}", *TINY])


def test_rows_schema_and_nfe(result):
    _, payload = result
    rows = payload["rows"]
    for row in rows:
        assert {"model", "steps", "nfe", "guidance_scale", "samples_per_s"} <= row.keys()
        assert row["samples_per_s"] > 0
    teacher = {(r["steps"], r["guidance_scale"]): r for r in rows if r["model"] == "teacher"}
    scale = payload["reference"]["guidance_scale"]
    assert scale == 3.0  # toy2d's AGD experiment guides its teacher at 3
    assert set(teacher) == {(1, 1.0), (2, 1.0), (1, scale), (2, scale)}
    for (steps, s), row in teacher.items():
        assert row["nfe"] == (steps if s == 1.0 else 2 * steps)  # CFG: 2 evaluations per sample per step
        assert row["cfg_batching"] == (None if s == 1.0 else "2B")
    students = [r for r in rows if r["model"] != "teacher"]
    assert {(r["model"], r["steps"]) for r in students} == {("dmd2", 1), ("dmd2", 2), ("agd", 1), ("agd", 2)}
    assert all(r["nfe"] == r["steps"] for r in students)
    assert {r["model"]: r["generator"] for r in students} == {"dmd2": "Generator", "agd": "AdapterGenerator"}


def test_ratio_follows_from_the_rows(result):
    _, payload = result
    ref = payload["reference"]
    assert ref["samples_per_s"] == round((ref["samples_per_s_before"] + ref["samples_per_s_after"]) / 2, 3)
    ref_row = next(r for r in payload["rows"] if r["model"] == "teacher" and r["steps"] == 2
                   and r["guidance_scale"] == ref["guidance_scale"])
    assert ref_row["samples_per_s"] == ref["samples_per_s"] and ref_row["nfe"] == ref["nfe"] == 4
    students = [r for r in payload["rows"] if r["model"] != "teacher"]
    assert set(payload["speedup_over_nfe_ratio"]) == {f"{r['model']}@{r['steps']}" for r in students}
    for r in students:
        expected = (r["samples_per_s"] / ref_row["samples_per_s"]) / (ref_row["nfe"] / r["nfe"])
        assert payload["speedup_over_nfe_ratio"][f"{r['model']}@{r['steps']}"] == expected
        assert r["speedup_over_nfe_ratio"] == expected
        mean = (r["samples_per_s_mean"] / ref["samples_per_s_mean"]) / (ref["nfe"] / r["nfe"])
        assert payload["speedup_over_nfe_ratio_mean"][f"{r['model']}@{r['steps']}"] == mean
    ones = [v for k, v in payload["speedup_over_nfe_ratio"].items() if k.endswith("@1")]
    assert payload["criterion"]["min_one_step_ratio"] == min(ones)
    assert payload["criterion"]["passed"] == (min(ones) >= 0.8)


def test_files_written(result):
    out, payload = result
    on_disk = json.loads((out / "bench_speed.json").read_text())
    assert on_disk["rows"] == payload["rows"] and "machine" in on_disk
    table = (out / "bench_speed.md").read_text()
    assert "| model | steps | nfe |" in table and "dmd2" in table and "agd" in table
    assert (out / "bench_speed.png").stat().st_size > 1000


def test_interleaved_rounds_time_every_sampler():
    calls: list[str] = []
    items = [Timed(name, lambda n=name: calls.append(n), lambda n=name: calls.append(f"warm {n}"))
             for name in ("a", "b")]
    time_interleaved(items, "cpu", rounds=3, min_time_s=0.0)
    assert calls == ["warm a", "warm b"] + ["a", "b"] * 3  # warm-ups first, then a, b alternate
    assert all(len(i.times_s) == 3 and len(i.round_best_s) == 3 and i.best_s == min(i.times_s) for i in items)


@pytest.mark.parametrize("args, message", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["dataset=mnist"], "unknown dataset 'mnist'"),
    (["guidance_scale=1"], "guidance_scale must differ from 1"),
    (["student_steps=[0]"], "student_steps must be"),
])
def test_bad_arguments_one_line_exit_2(tmp_path, capsys, args, message):
    assert main(["bench", "speed", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "bench_speed.json").exists()
