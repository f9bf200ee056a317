"""``stepdistill plan experiment=E|backbone=B|teacher.path=DIR gpus=N gpu_memory=80GB [resolution=1024]
[gpus_per_node=8] [frames=81] [any training override] [out=plan.json]``: does the job fit?

Prints, per GPU, the memory of each role (weights, gradients, optimizer state) and of the EMA, the
teacher, the text encoders, the VAE, the activations and the working copies, at the peak phase of a
training step, under the configured strategy and memory switches; whether it fits in ``gpu_memory``;
and which switches would make it fit, alone and together. Nothing is downloaded or allocated: the
models are built from configs on the ``meta`` device (``stepdistill.planner``; the accounting is
documented in ``stepdistill/planner/estimate.py`` and ``docs/memory.md``).

``out=plan.json`` also writes the plan: ``parameters``, ``per_gpu_bytes``, ``fits``, ``strategy``,
``suggestions``, the per-role breakdown (``roles``), the per-phase totals and the settings it read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepdistill.planner.config import compose_job_config, job_from_config, split_args, stack_for
from stepdistill.planner.estimate import GB, Job, Plan, estimate
from stepdistill.planner.stack import MetaStack
from stepdistill.planner.suggest import Suggestion, suggest


def plan(args: Sequence[str]) -> dict[str, Any]:
    """The plan of ``args`` (the command's arguments) as the dictionary ``out=`` writes."""
    plan_args, overrides = split_args(args)
    cfg = compose_job_config(plan_args, overrides)
    stack = stack_for(cfg, plan_args)
    job = job_from_config(cfg, plan_args, stack)
    result = estimate(stack, job)
    singles, together = suggest(stack, job, result.per_gpu_bytes) if not result.fits else ([], None)
    return report(stack, job, result, singles, together, experiment=cfg.get("experiment_name"),
                  algorithm=str(cfg.algorithm.get("_target_", "")).rsplit(".", 1)[-1])


def report(stack: MetaStack, job: Job, result: Plan, singles: list[Suggestion], together: Suggestion | None,
           **extra: Any) -> dict[str, Any]:
    h, w = job.resolution or stack.resolution
    settings = {"stack": stack.name, **extra, "gpus": job.gpus, "gpus_per_node": job.gpus_per_node,
                "gpu_memory_bytes": job.gpu_memory, "strategy": job.strategy,
                "teacher_placement": job.teacher_placement, "gradient_checkpointing": job.checkpointing,
                "mixed_precision": job.mixed_precision, "teacher_dtype": job.teacher_dtype,
                "optimizers": dict(job.optimizers), "data_cache": job.cached, "resolution": [h, w],
                "frames": job.frames or stack.frames, "batch_size": job.batch_size,
                "per_gpu_batch": job.batch_size // job.gpus, "micro_batch": job.micro_batch}
    return {**settings, **result.as_dict(), "suggestions": [s.as_dict() for s in singles],
            "suggested_combination": together.as_dict() if together is not None else None}


def format_plan(p: dict[str, Any]) -> str:
    """The printed table (GB per GPU)."""
    h, w = p["resolution"]
    lines = [f"stepdistill plan: {p['stack']} ({p.get('experiment') or 'preset'}, {p.get('algorithm', '')}) on "
             f"{p['gpus']} GPU(s) of {p['gpu_memory_bytes'] / GB:.1f} GB; strategy {p['strategy']}, teacher "
             f"{p['teacher_placement']} in {p['teacher_dtype']}, checkpointing "
             f"{'on' if p['gradient_checkpointing'] else 'off'}, {p['mixed_precision']} compute",
             f"batch {p['batch_size']} = {p['per_gpu_batch']} per GPU (micro-batch {p['micro_batch']}) at {h}x{w} px"
             + (f", {p['frames']} frames" if p.get("frames") else "")
             + f"; peak in the {p['peak_phase']} phase",
             "",
             f"{'role':<16}{'parameters':>15}{'weights':>10}{'gradients':>11}{'optimizer':>11}{'total':>9}"
             "  (GB per GPU)"]
    for r in p["roles"]:
        params = f"{r['parameters']:,}" if r["parameters"] else ""
        lines.append(f"{r['role']:<16}{params:>15}{r['weights'] / GB:>10.2f}{_gb(r['gradients']):>11}"
                     f"{_gb(r['optimizer']):>11}{r['total'] / GB:>9.2f}  {r['note']}")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines += ["", f"{'total':<16}{'':>15}{'':>10}{'':>11}{'':>11}{p['per_gpu_bytes'] / GB:>9.2f}  of "
              f"{p['gpu_memory_bytes'] / GB:.2f} GB per GPU: {verdict}"]
    if p["suggestions"]:
        lines += ["", "switches (each alone):"]
        lines += [f"  {s['override']:<48}{s['per_gpu_bytes'] / GB:>8.2f} GB  {'fits' if s['fits'] else ''}"
                  for s in p["suggestions"]]
        combo = p["suggested_combination"]
        lines += ["", f"together: {combo['override']} -> {combo['per_gpu_bytes'] / GB:.2f} GB per GPU" if combo
                  else "no combination of these switches fits: more GPUs, or a smaller model / resolution"]
    return "\n".join(lines)


def _gb(value: float) -> str:
    return f"{value / GB:.2f}" if value else "-"


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """``stepdistill plan ...``: print the table; with ``out=FILE`` also write the plan as JSON."""
    result = plan(overrides)
    print(format_plan(result))
    out = next((o.split("=", 1)[1] for o in overrides if o.startswith("out=")), None)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwritten to {out}")
    return result

