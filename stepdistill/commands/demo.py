"""``make demo``: distil the shipped digits teacher into a 1-step generator with DMD2 on the CPU.

Runs ``stepdistill train experiment=digits/dmd2`` into ``runs/demo`` (or ``output_dir=``), which ends
with ``metrics.json`` and ``report.md`` (teacher-vs-student samples, FID vs NFE, loss curves). An
existing demo run is replaced (``overwrite=true``) unless ``trainer.resume=auto`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence

from stepdistill.commands import train


def run(overrides: Sequence[str]) -> None:
    args = list(overrides)
    if not any(a.startswith("output_dir=") for a in args):
        args.append("output_dir=runs/demo")
    if not any(a.startswith(("overwrite=", "trainer.resume=")) for a in args):
        args.append("overwrite=true")
    result = train.run(["experiment=digits/dmd2", *args])
    print(f"demo report: {result.output_dir / 'report.md'}")
