"""AGD adapters on a step-distilled student of the same base: ``python scripts/agd_on_student.py
run=STUDENT_RUN adapters=DIR [scales=[2,3,4]] [steps=K] [num_samples=N] [seed=0] [out=DIR]``.

``adapters`` is a directory `stepdistill export format=adapters` wrote, or an AGD run's
``student/adapters``. The adapters attach to the student's network (``GuidanceAdapters.load``) and
act on every forward of its own sampler at each scale (``GuidanceAdapters.guiding``); the first row
is the student without them. Metrics come from the run's task (digits: FID, class accuracy) on the
same labels and seed. Writes ``<out>/agd_on_student.json`` and ``.md`` (out: ``<run>/agd_on_student``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from stepdistill.adapters import GuidanceAdapters
from stepdistill.args import parse_args
from stepdistill.errors import StepdistillError
from stepdistill.eval.run_eval import student_samples
from stepdistill.pipelines.few_step import load_run
from stepdistill.workflows.teacher import build_task

KEYS = {"run": "str", "adapters": "str", "scales": "ints", "steps": "int", "num_samples": "int", "seed": "int",
        "out": "str", "batch_size": "int"}


def main(argv: list[str]) -> Path:
    args = parse_args(argv, KEYS, "scripts/agd_on_student.py")
    run = load_run(args.get("run"))
    if not args.get("adapters"):
        raise StepdistillError("adapters=DIR is required (an `export format=adapters` directory)")
    task, generator = build_task(run.config), run.generator
    adapters = GuidanceAdapters.load(args["adapters"], generator.denoiser)
    steps, seed, bs = args.get("steps", generator.steps), args.get("seed", 0), args.get("batch_size", 256)
    labels = task.eval_labels(args.get("num_samples"))
    rows = []
    for scale in [None, *args.get("scales", [2, 3, 4])]:
        start = time.perf_counter()
        if scale is None:
            x = student_samples(generator, labels, task.null_class, steps, seed, bs)
        else:
            with adapters.guiding(generator.denoiser, float(scale)):
                x = student_samples(generator, labels, task.null_class, steps, seed, bs)
        rows.append({"adapters": scale is not None, "scale": scale, "steps": steps,
                     **task.metrics(x, labels), "sampling_wall_s": round(time.perf_counter() - start, 2)})
        print(rows[-1])
    out = Path(args.get("out") or run.path / "agd_on_student")
    out.mkdir(parents=True, exist_ok=True)
    record = {"run": str(run.path), "adapters": args["adapters"], "num_samples": len(labels), "seed": seed,
              "rows": rows}
    (out / "agd_on_student.json").write_text(json.dumps(record, indent=2) + "\n")
    keys = [k for k in rows[0] if k not in ("adapters",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
              for r in rows]
    (out / "agd_on_student.md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except StepdistillError as err:
        raise SystemExit(f"error: {err}") from None
