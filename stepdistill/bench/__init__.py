"""``stepdistill bench <suite>``: the benchmark suites that publish stepdistill's numbers.

Each suite module has ``run(overrides)`` and writes ``<output_dir>/bench_<suite>.json``, a markdown
table ``bench_<suite>.md`` and a plot ``bench_<suite>.png``; ``scripts/results_table.py`` turns the
JSON files into the README's results table.
"""
