"""The f-distill mode-coverage study on the imbalanced toy2d mixture (issue 4).

Distils the shipped ``toy2d_imbalanced`` teacher (8 modes on a circle of radius 3: five heavy ones of
weight 10, then three light ones of weight 1; unconditional) into a 1-step generator with each of the
seven f-divergences (``experiment=toy2d_imbalanced/fdistill``) and with SiD (``toy2d_imbalanced/sid``),
over several seeds, and writes a table of mode coverage, swd and class accuracy (means over seeds) with
the teacher's 100-step row:

    python scripts/toy2d_mode_study.py --out runs/mode_study [--seeds 0 1 2] [--steps 3000] [--methods js reverse_kl] [--set key=value ...]

Writes ``<out>/study.json`` and ``<out>/study.md``; each run keeps its own run directory
(``<out>/<method>/seed<k>/`` with metrics.json and report.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from stepdistill.cli import main as cli
from stepdistill.losses import F_DIVERGENCES

METHODS = (*F_DIVERGENCES, "sid")
KEYS = ("mode_coverage", "swd", "class_accuracy")


def run_one(out: Path, method: str, seed: int, steps: int, extra: list[str]) -> dict:
    """Train (or reuse) one run and return its metrics.json."""
    run = out / method / f"seed{seed}"
    if not (run / "metrics.json").is_file():
        experiment = "toy2d_imbalanced/sid" if method == "sid" else "toy2d_imbalanced/fdistill"
        args = ["train", f"experiment={experiment}", f"output_dir={run}", f"trainer.seed={seed}",
                f"trainer.max_steps={steps}", "trainer.progress=false", "evaluate.teacher_steps=100",
                "overwrite=true", *extra]
        if method != "sid":
            args.append(f"algorithm.divergence={method}")
        if cli(args) != 0:
            raise SystemExit(f"run {run} failed")
    return json.loads((run / "metrics.json").read_text())


def summarise(results: dict[str, list[dict]]) -> tuple[dict, str]:
    """Per-method means over seeds, plus a markdown table with the teacher's row."""
    table = {}
    for method, runs in results.items():
        per_seed = [r["student"]["metrics"] for r in runs]
        table[method] = {k: mean(m[k] for m in per_seed) for k in KEYS}
        table[method]["per_seed_swd"] = [round(m["swd"], 4) for m in per_seed]
        table[method]["per_seed_coverage"] = [m["mode_coverage"] for m in per_seed]
    teacher = next(iter(results.values()))[0]["teacher"]
    lines = ["| method | mode coverage | swd | class accuracy | swd per seed |", "|---|---|---|---|---|",
             f"| teacher ({teacher['steps']} steps) | {teacher['metrics']['mode_coverage']:.3f} | "
             f"{teacher['metrics']['swd']:.4f} | {teacher['metrics']['class_accuracy']:.1%} | |"]
    for method, row in table.items():
        lines.append(f"| {method} | {row['mode_coverage']:.3f} | {row['swd']:.4f} | {row['class_accuracy']:.1%} | "
                     f"{', '.join(map(str, row['per_seed_swd']))} |")
    return {"teacher": teacher["metrics"], "methods": table}, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra overrides for every run (e.g. algorithm.gan_critic_weight=1.0)")
    args = parser.parse_args(argv)
    results = {m: [run_one(args.out, m, s, args.steps, args.overrides) for s in args.seeds] for m in args.methods}
    summary, markdown = summarise(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "study.json").write_text(json.dumps(summary, indent=2))
    (args.out / "study.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
