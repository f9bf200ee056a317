"""The README's generated results block: rendering from bench_*.json, writing between the markers, --check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill.bench import results_table
from stepdistill.bench.common import machine_line
from stepdistill.errors import StepdistillError

MACHINE = {"cpu": "Test CPU 9000", "cpu_cores": 2, "torch_threads": 1, "torch": "2.13.0", "gpu": None,
           "platform": "Linux", "date": "2026-01-02"}
GPU = {**MACHINE, "gpu": "NVIDIA H200", "date": "2026-01-03"}
QUALITY = {"rows": [{"dataset": "toy2d", "experiment": "toy2d/dmd2", "algorithm": "DMD2", "metric": "swd",
                     "value": 0.0812, "teacher_value": 0.0764, "ratio": 0.0812 / 0.0764, "steps": 1, "nfe": 1,
                     "iterations": 4321, "wall_s": 121.5, "budget_s": 120.0}],
           "teacher_curves": {"toy2d": {"metric": "swd", "guidance_scale": 1.0,
                                        "points": [{"steps": 1, "nfe": 1, "value": 1.345},
                                                   {"steps": 50, "nfe": 50, "value": 0.0764}]}},
           "teacher_steps": 50, "machine": MACHINE}
SPEED = {"rows": [{"model": "teacher", "steps": 50, "nfe": 100, "guidance_scale": 3.0, "samples_per_s": 812.5},
                  {"model": "dmd2", "steps": 1, "nfe": 1, "guidance_scale": 1.0, "samples_per_s": 65432.1}],
         "speedup_over_nfe_ratio": {"dmd2@1": 0.806}, "machine": GPU}
OVERHEAD = {"DMD2": {"trainer_s_per_it": 0.0123, "bare_s_per_it": 0.0117, "ratio": 1.051}, "machine": MACHINE}
MEMORY = {"rows": [{"experiment": "tiny_sd/lcm_lora", "algorithm": "ConsistencyDistillation", "kind": "lora",
                    "trainable_params": 123456, "total_params": 9876543, "trainable_share": 0.0125,
                    "peak_rss_mib": 1534.2, "baseline_rss_mib": 812.0}], "machine": MACHINE}
README = "# project\n\nintro text  \n\n<!-- bench:begin -->\nold numbers\n<!-- bench:end -->\n\ntail\r\n  spaces \n"


def write(root: Path, **payloads) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for suite, payload in payloads.items():
        (root / f"bench_{suite}.json").write_text(json.dumps(payload))
    return root


def test_render_has_the_numbers_and_machines(tmp_path):
    block = results_table.render(write(tmp_path, quality=QUALITY, speed=SPEED, overhead=OVERHEAD, memory=MEMORY))
    for text in ["toy2d/dmd2", "0.0812", "0.0764", "1.063", "4321", "121.5", "120 s of training", "1.345",
                 "65,432", "812.5", "dmd2@1 0.806", "0.0123", "1.051", "123,456", "9,876,543", "1534",
                 machine_line(MACHINE), machine_line(GPU)]:
        assert text in block, text
    assert "machine" not in [line.split("|")[1].strip() for line in block.splitlines() if line.startswith("| ")]
    order = [block.index(h) for h in ("### Quality", "### Sampling speed", "### Trainer overhead", "### Memory")]
    assert order == sorted(order)


def test_only_present_files_are_rendered(tmp_path):
    block = results_table.render(write(tmp_path, overhead=OVERHEAD))
    assert "### Trainer overhead" in block and "### Quality" not in block and "### Memory" not in block
    with pytest.raises(StepdistillError, match="no bench_"):
        results_table.render(write(tmp_path / "empty"))


def test_write_keeps_the_rest_byte_identical_and_check_detects_stale(tmp_path):
    bench = write(tmp_path / "bench", quality=QUALITY, speed=SPEED)
    readme = tmp_path / "README.md"
    readme.write_bytes(README.encode())
    assert results_table.main([str(bench), "--readme", str(readme), "--check"]) == 1
    assert readme.read_bytes() == README.encode()  # --check writes nothing
    assert results_table.main([str(bench), "--readme", str(readme)]) == 0
    text = readme.read_bytes().decode()
    head, rest = text.split(results_table.BEGIN)
    block, tail = rest.split(results_table.END)
    assert head == README.split(results_table.BEGIN)[0]
    assert tail == README.split(results_table.END)[1]
    assert "old numbers" not in block and machine_line(MACHINE) in block and "0.0812" in block
    assert results_table.main([str(bench), "--readme", str(readme), "--check"]) == 0
    assert results_table.update_readme(bench, readme) is False  # idempotent
    stale = {**QUALITY, "rows": [{**QUALITY["rows"][0], "value": 0.09}]}
    write(bench, quality=stale)
    assert results_table.main([str(bench), "--readme", str(readme), "--check"]) == 1


def test_missing_markers_is_an_error(tmp_path, capsys):
    bench = write(tmp_path / "bench", overhead=OVERHEAD)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n")
    with pytest.raises(StepdistillError, match="bench:begin"):
        results_table.update_readme(bench, readme)
    assert results_table.main([str(bench), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("results_table: error:") and "add the two markers" in err and err.count("\n") == 1
    assert readme.read_text() == "# no markers here\n"
    readme.write_text(f"{results_table.END}\n{results_table.BEGIN}\n")  # wrong order
    with pytest.raises(StepdistillError, match="bench:begin"):
        results_table.update_readme(bench, readme)


def test_script_is_thin_and_works(tmp_path):
    bench = write(tmp_path / "bench", memory=MEMORY)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    script = Path(__file__).resolve().parents[2] / "scripts" / "results_table.py"
    done = subprocess.run([sys.executable, str(script), str(bench), "--readme", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "123,456" in readme.read_text()


# ----------------------------------------------------------------- provenance, summary, methods, run records
def test_rows_name_their_config_and_whether_the_shipped_one_still_has_it(tmp_path, monkeypatch):
    monkeypatch.setattr(results_table, "shipped_config_sha", {"toy2d/dmd2": "aaaa", "toy2d/sid": "bbbb"}.get)
    rows = [{**QUALITY["rows"][0], "config_sha": "aaaa"},
            {**QUALITY["rows"][0], "experiment": "toy2d/sid", "config_sha": "old0"},
            {**QUALITY["rows"][0], "experiment": "toy2d/gone", "config_sha": "cccc"},
            {**QUALITY["rows"][0], "experiment": "toy2d/lcm"}]
    bench = write(tmp_path, quality={**QUALITY, "rows": rows})
    lines = {line.split(" | ")[0].lstrip("| "): line for line in results_table.render_summary(bench).splitlines()
             if line.startswith("| toy2d/")}
    assert lines["toy2d/dmd2"].endswith("| `aaaa` | same |")
    assert lines["toy2d/sid"].endswith("| `old0` | changed since |")
    assert lines["toy2d/gone"].endswith("| `cccc` | not shipped |")
    assert lines["toy2d/lcm"].endswith("| - | not recorded |")
    assert "| `aaaa` | same |" in results_table.render(bench)  # the full tables carry it too


def test_methods_table_lists_shipped_experiments_and_prefers_a_current_run_record(tmp_path, monkeypatch):
    monkeypatch.setattr(results_table, "shipped_config_sha", lambda e: "same0")
    digits = write(tmp_path / "digits", quality={**QUALITY, "rows": [
        {**QUALITY["rows"][0], "dataset": "digits", "experiment": "digits/sid", "metric": "fid", "value": 1.5,
         "teacher_value": 0.5, "ratio": 3.0, "config_sha": "old0"}]})
    (digits / "run_dmd2.json").write_text(json.dumps({
        "experiment": "digits/dmd2", "config_sha": "same0", "metric": "fid", "value": 0.4, "teacher_value": 0.2,
        "ratio": 2.0, "steps": 1, "iterations": 3000, "noise_seeds": [0, 1], "machine": MACHINE}))
    table = results_table.render_methods(digits)
    dmd2 = next(line for line in table.splitlines() if line.startswith("| [DMD2](docs/methods/dmd2.md)"))
    sid = next(line for line in table.splitlines() if line.startswith("| [SiD](docs/methods/sid.md)"))
    assert "`dmd2_4step`" in dmd2 and "`dmd2_lora_24gb`" in dmd2  # from configs/experiment
    assert "digits fid 0.4 = 2x the teacher, 1 step, 3,000 iterations, mean over noise seeds 0, 1" in dmd2
    assert "digits fid 1.5 = 3x the teacher" in sid and "config changed since" in sid


def test_a_run_that_changed_its_shipped_config_is_not_recorded(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("experiment_name: toy2d/dmd2\ntrainer:\n  max_steps: 7\n")
    (run / "metrics.json").write_text("{}")
    (run / "train.json").write_text("{}")
    with pytest.raises(StepdistillError, match="changed the shipped config of toy2d/dmd2"):
        results_table.record_run(run, tmp_path)
    assert not list(tmp_path.glob("run_*.json"))
