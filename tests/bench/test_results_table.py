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
