"""The README's results block is exactly what scripts/results_table.py generates from the committed
benchmark files (benchmarks/<dataset>/bench_*.json): numbers in the README are never hand-typed."""

from pathlib import Path

from stepdistill.bench.results_table import render, replace_block

ROOT = Path(__file__).resolve().parents[2]
BENCH_DIRS = [ROOT / "benchmarks" / name for name in ("toy2d", "digits", "tiny_sd")]


def test_readme_results_block_matches_the_benchmark_files():
    readme = (ROOT / "README.md").read_text()
    assert replace_block(readme, render(BENCH_DIRS)) == readme, (
        "README.md's results block is stale: python scripts/results_table.py benchmarks/toy2d benchmarks/digits benchmarks/tiny_sd")
