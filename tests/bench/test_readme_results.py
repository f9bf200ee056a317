"""The README's and docs/benchmarks.md's generated tables are exactly what scripts/results_table.py
generates from the committed benchmark files (benchmarks/<dataset>/bench_*.json) and the shipped
configs: numbers in the README are never hand-typed, and a row whose experiment's config changed
says so."""

from pathlib import Path

import pytest

from stepdistill.bench.results_table import DEFAULT_FILES, blocks_in, regenerate

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIRS = [ROOT / "benchmarks" / name for name in ("toy2d", "digits", "tiny_sd")]
COMMAND = "python scripts/results_table.py benchmarks/toy2d benchmarks/digits benchmarks/tiny_sd"


@pytest.mark.parametrize("name", DEFAULT_FILES)
def test_generated_tables_match_the_benchmark_files(name):
    text = (ROOT / name).read_text()
    assert blocks_in(text), f"{name} lost its generated tables' markers"
    assert regenerate(text, BENCH_DIRS, name) == text, f"{name}'s generated tables are stale: {COMMAND}"


def test_readme_has_the_methods_table_and_the_results_summary():
    assert blocks_in((ROOT / "README.md").read_text()) == ["results", "methods"]
    assert blocks_in((ROOT / "docs" / "benchmarks.md").read_text()) == ["bench"]
