"""``make demo``: the embedded default job.

Until the distillation trainer lands, the demo measures the shipped digits teacher: FID and class
accuracy at 1..50 DDIM steps with CFG, a table, a FID-vs-NFE plot and a sample grid.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepdistill.commands import teacher
from stepdistill.config import compose


def run(overrides: Sequence[str]) -> None:
    args = list(overrides)
    if not any(a.startswith("output_dir=") for a in args):
        args.append("output_dir=runs/demo")
    cfg = compose("teacher", ["dataset=digits", *args])
    teacher.evaluate(cfg)
    print(f"demo report: {cfg.output_dir}/teacher_metrics.md")
