"""Thin entry script: ``python scripts/results_table.py BENCH_DIR [--readme README.md] [--check]``.

Regenerates the README's results block (between ``<!-- bench:begin -->`` and ``<!-- bench:end -->``) from
the ``bench_*.json`` files in BENCH_DIR, with the date and machine of each; ``--check`` writes nothing and
exits 1 when the block is stale. The logic lives in ``stepdistill.bench.results_table``.
"""

import sys

from stepdistill.bench.results_table import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
