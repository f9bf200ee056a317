"""The scale of the digits FID: what real digits, copies of them and the teacher score (about 2 minutes).

    python scripts/digits_fid_scale.py [--out DIR] [--teacher-seeds 0 1 2 3] [--runs RUN_DIR ...] [--steps 1]

Prints (and with ``--out`` writes ``fid_scale.json``) the FID of fresh real digits extrapolated to the
evaluation's 1,797-vs-1,797 (:func:`stepdistill.eval.fid_scale.fresh_sample_fid`), of bootstrap copies
of the real digits, of the shipped teacher at 50 steps over several noise seeds, and of any given
runs' students over the same seeds: all through the evaluation's labels, noise and metric code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean, pstdev

from stepdistill.bench.speed import load_teacher
from stepdistill.data.digits import load_digits_tensors
from stepdistill.eval.digits_fid import digits_fid
from stepdistill.eval.fid_scale import copy_fid, fresh_sample_fid, nearest_distances
from stepdistill.eval.run_eval import generate, student_samples, teacher_sampler
from stepdistill.pipelines.runs import load_run


def _spread(values: list[float]) -> dict:
    return {"mean": round(mean(values), 4), "std": round(pstdev(values), 4), "values": [round(v, 4) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--teacher-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--runs", type=Path, nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: each run's own)")
    args = parser.parse_args()

    images, labels = load_digits_tensors()
    fresh = fresh_sample_fid(images, labels)
    result = {"fresh_real_digits": fresh, "bootstrap_copy": _spread(copy_fid(images, labels))}
    teacher, task = load_teacher("digits")
    eval_labels = task.eval_labels()
    sample = teacher_sampler(teacher, 50, 1.0)
    teacher_samples = {seed: generate(sample, task.sample_shape, eval_labels, task.null_class, seed, 256)
                       for seed in args.teacher_seeds}
    result["teacher_50_steps"] = _spread([digits_fid(x) for x in teacher_samples.values()])
    first = teacher_samples[args.teacher_seeds[0]]
    result["nearest_training_digit_median"] = {
        "teacher_50_steps": round(float(nearest_distances(first, images).median()), 4),
        "real_digit_leave_one_out": round(float(nearest_distances(images, images, exclude_self=True).median()), 4)}
    for run in args.runs:
        generator = load_run(run).generator.eval()
        steps = args.steps or generator.steps
        result[f"{run} ({steps} steps)"] = _spread([digits_fid(student_samples(generator, eval_labels, task.null_class,
                                                                               steps, seed, 256))
                                                    for seed in args.teacher_seeds])
    for n, (m, s) in fresh["by_size"].items():
        print(f"fresh real digits, {n} vs {n} (class-stratified, disjoint): FID {m:.3f} +- {s:.3f}")
    full = fresh["at_full_size"]
    print(f"fresh real digits extrapolated to {len(images)} vs {len(images)}: FID {full['fit']:.3f} "
          f"(fit a + 2c/n: a = {fresh['fit']['a']:.3f}, c = {fresh['fit']['c']:.1f}), {full['largest_n']:.3f} "
          f"(1/n from the largest size)")
    near = result["nearest_training_digit_median"]
    print(f"median pixel distance to the nearest training digit: teacher samples {near['teacher_50_steps']:.3f}, "
          f"real digits (nearest other digit) {near['real_digit_leave_one_out']:.3f}")
    for name in [k for k in result if k not in ("fresh_real_digits", "nearest_training_digit_median")]:
        row = result[name]
        print(f"{name}: FID {row['mean']:.3f} +- {row['std']:.3f} over seeds {row['values']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fid_scale.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
