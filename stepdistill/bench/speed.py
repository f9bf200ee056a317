"""``stepdistill bench speed dataset=digits output_dir=DIR``: samples per second of the teacher and of
the few-step students, on the same batch and noise, in one process.

Rows (``bench_speed.json``):

- **teacher** at ``steps`` (default 1, 2, 4, 8, 16, 25, 50) solver steps (DDIM / Euler,
  ``Teacher.sample``), without CFG (``guidance_scale`` 1, NFE = steps) and with CFG at the dataset's
  scale (NFE = 2 x steps: ``guided_predict`` runs one forward over the 2B batch [cond; null] per step,
  which is two network evaluations per sample; ``cfg_batching`` records it).
- **students**: one per experiment (default: one per shipped algorithm of the dataset,
  ``bench.common.default_experiments``; the ``_long`` / ``_4step`` variants build the same generator
  and sample at the same speed) at ``student_steps`` (default 1, 2, 4), NFE = steps: one network
  evaluation per step (AGD's adapters run inside that forward, carrying the guidance). A student's
  speed depends on its architecture and sampler, not on its weights, so by default each is built from
  its experiment config exactly as training builds it (untrained); ``runs=[DIR,...]`` times trained run
  directories instead. Students sample through ``pipelines.few_step.generate``, the path the CLI,
  evaluation and the diffusers pipeline share.

Timing (``bench.timing``): a warm-up call per sampler (at one step), then ``repeats`` interleaved
rounds, each timing every sampler; a sampler's time is its best call. The reference, the teacher at
``reference_steps`` (50) with CFG, is timed twice per round, right before and right after the students,
and its samples/s is the mean of the two bests (both recorded).

``speedup_over_nfe_ratio["<model>@<steps>"] = (student_sps / reference_sps) / (reference_nfe /
student_nfe)``: 1.0 when every network evaluation costs the same in both; below 1 the student's
sampler costs more than its network evaluations. ``speedup_over_nfe_ratio_no_cfg`` is the same against
the teacher without CFG at ``reference_steps`` (it isolates the 2B-batched CFG forward's efficiency),
and ``speedup_over_nfe_ratio_mean`` the same from mean call times (``samples_per_s_mean``): on a machine
shared with other processes a best-of favours short calls, which can fall in quiet moments, while a
50-step call always sits through the average load.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from stepdistill.bench.common import (
    default_experiments,
    markdown_table,
    parse_bench_args,
    shipped_experiments,
    write_suite,
)
from stepdistill.bench.timing import Timed, time_interleaved
from stepdistill.conditioning import Conditioning
from stepdistill.config import compose, compose_train, configs_dir, instantiate
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.eval.report import pyplot
from stepdistill.pipelines.few_step import generate
from stepdistill.pipelines.runs import load_run
from stepdistill.roles import Teacher
from stepdistill.workflows.teacher import build_task

KEYS = {"output_dir": "str", "dataset": "str", "batch_size": "int", "repeats": "int", "steps": "ints",
        "student_steps": "ints", "experiments": "strs", "runs": "strs", "guidance_scale": "float",
        "device": "str", "reference_steps": "int", "min_time_s": "float", "seed": "int", "threads": "int"}
DEFAULTS = {"dataset": "digits", "batch_size": 256, "repeats": 2, "steps": [1, 2, 4, 8, 16, 25, 50],
            "student_steps": [1, 2, 4], "device": "cpu", "reference_steps": 50, "min_time_s": 3.0, "seed": 0}
#: the issue's bar: a 1-step student's speedup is at least this fraction of its NFE ratio
THRESHOLD = 0.8
#: the CFG scale when no shipped experiment of the dataset guides its teacher
FALLBACK_CFG_SCALE = 2.0
CFG_BATCHING = "one forward over the 2B batch [cond; null] per step (2 network evaluations per sample)"


@dataclass
class Student:
    """A few-step generator to time: ``label`` names it in rows and ratio keys, ``source`` is the
    experiment (``digits/dmd2``) or run directory it comes from."""

    label: str
    source: str
    generator: Any


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """Time the teacher and the students; write bench_speed.json / .md / .png under ``output_dir``."""
    args = {**DEFAULTS, **parse_bench_args(overrides, KEYS, "speed")}
    _check(args)
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    device = _device(args["device"])
    dataset = args["dataset"]
    scale = float(args["guidance_scale"]) if args.get("guidance_scale") is not None else default_cfg_scale(dataset)
    if scale == 1.0:
        raise StepdistillError("guidance_scale must differ from 1 (1 means no CFG: the rows would repeat)")
    teacher, task = load_teacher(dataset)
    teacher = teacher.to(device)
    experiments = [e if "/" in e else f"{dataset}/{e}" for e in args.get("experiments") or []]
    if args.get("runs"):  # trained students (plus any experiments named too)
        students = students_from_runs(args["runs"]) + students_from_experiments(experiments, teacher)
    else:
        students = students_from_experiments(experiments or default_experiments(dataset), teacher)
    students = _unique_labels(students)
    for s in students:
        s.generator = s.generator.to(device).eval().requires_grad_(False)

    b = int(args["batch_size"])
    noise = torch.randn(b, *task.sample_shape, generator=torch.Generator().manual_seed(int(args["seed"])))
    labels = torch.arange(b) % max(1, task.null_class)
    noise, cond = noise.to(device), Conditioning.labels(labels, task.null_class).to(device)
    payload = measure(teacher, students, noise, cond, steps=args["steps"], student_steps=args["student_steps"],
                      guidance_scale=scale, reference_steps=int(args["reference_steps"]),
                      repeats=int(args["repeats"]), min_time_s=float(args["min_time_s"]), seed=int(args["seed"]))
    payload = {"suite": "speed", "dataset": dataset, "device": str(device), **payload}
    write_suite(args["output_dir"], "speed", payload, render_markdown(payload),
                plot=lambda path: plot(payload, path),
                title=f"Samples/s on {dataset}, batch {b}, one process; speedup over the NFE ratio against the "
                      f"{payload['reference']['steps']}-step CFG teacher (1.0 = every network evaluation costs the same).")
    return payload


def _check(args: dict[str, Any]) -> None:
    for key in ("batch_size", "repeats", "reference_steps"):
        if int(args[key]) < 1:
            raise StepdistillError(f"{key} must be >= 1, got {args[key]}")
    for key in ("steps", "student_steps"):
        if not args[key] or min(args[key]) < 1:
            raise StepdistillError(f"{key} must be a non-empty list of step counts >= 1, got {args[key]}")
    if float(args["min_time_s"]) < 0:
        raise StepdistillError(f"min_time_s must be >= 0, got {args['min_time_s']}")


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StepdistillError(f"unknown device {name!r}; e.g. cpu, cuda, cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StepdistillError("device=cuda but no CUDA device is available; use device=cpu")
    return device


# --------------------------------------------------------------------------- models
def load_teacher(dataset: str):
    """The dataset's shipped teacher (``configs/teacher_recipe/<dataset>.yaml``: ``teacher.path``) and task."""
    cfg = compose("teacher", [f"dataset={dataset}"])
    return Teacher(load_denoiser(cfg.teacher.path)), build_task(cfg)


def default_cfg_scale(dataset: str) -> float:
    """The CFG scale the dataset's shipped experiments guide their teacher with (digits: AGD's 3.0);
    ``FALLBACK_CFG_SCALE`` when none guides."""
    for name in shipped_experiments(dataset):
        node = OmegaConf.load(configs_dir() / "experiment" / f"{name}.yaml").get("teacher") or {}
        value = node.get("guidance_scale", 1.0)
        if isinstance(value, (int, float)) and float(value) != 1.0:
            return float(value)
    return FALLBACK_CFG_SCALE


def students_from_experiments(experiments: Sequence[str], teacher) -> list[Student]:
    """Each experiment's generator, built from its config around a copy of the teacher's denoiser
    (as ``workflows.train.build_algorithm`` builds it; a copy so that a LoRA or adapter student never
    hooks into the timed teacher)."""
    out = []
    for name in experiments:
        cfg = compose_train([f"experiment={name}"])
        generator = instantiate(cfg.generator, denoiser=copy.deepcopy(teacher.denoiser))
        out.append(Student(name.rsplit("/", 1)[-1], name, generator))
    return out


def students_from_runs(runs: Sequence[str]) -> list[Student]:
    """Trained students from run directories (``pipelines.runs.load_run``), labelled by the
    run's experiment name (else the directory's name)."""
    out = []
    for path in runs:
        run_ = load_run(path)
        name = run_.config.get("experiment_name") if run_.config is not None else None
        out.append(Student(str(name).rsplit("/", 1)[-1] if name else run_.path.name, str(run_.path), run_.generator))
    return out


def _unique_labels(students: list[Student]) -> list[Student]:
    seen: dict[str, int] = {}
    for s in students:
        seen[s.label] = seen.get(s.label, 0) + 1
    for s in students:
        if seen[s.label] > 1:
            s.label = f"{s.label}[{Path(s.source).name}]"
    return students


# --------------------------------------------------------------------------- measurement
def measure(teacher, students: Sequence[Student], noise: torch.Tensor, cond, *, steps: Sequence[int],
            student_steps: Sequence[int], guidance_scale: float, reference_steps: int = 50, repeats: int = 3,
            min_time_s: float = 3.0, seed: int = 0) -> dict[str, Any]:
    """Rows, reference and ratios (the JSON payload without the machine record)."""
    device = noise.device

    def teacher_call(k: int, s: float) -> Callable[[], object]:
        return lambda: teacher.sample(noise, cond, k, guidance_scale=s)

    def student_call(generator, k: int) -> Callable[[], object]:
        return lambda: generate(generator, cond, k, torch.Generator().manual_seed(seed), noise=noise)

    ref_key = (reference_steps, guidance_scale)
    ref_warm = teacher_call(1, guidance_scale)
    before = Timed("reference before", teacher_call(*ref_key), ref_warm)
    after = Timed("reference after", teacher_call(*ref_key), ref_warm)
    student_items = [(s, k, Timed(f"{s.label}@{k}", student_call(s.generator, k), student_call(s.generator, 1)))
                     for s in students for k in student_steps]
    teacher_items = [((k, s), Timed(f"teacher@{k} s={s:g}", teacher_call(k, s), teacher_call(1, s)))
                     for s in (1.0, guidance_scale) for k in steps if (k, s) != ref_key]
    order = [before, *(t for *_, t in student_items), after, *(t for _, t in teacher_items)]
    print(f"bench speed: timing {len(order)} samplers (batch {len(noise)}) in {repeats} interleaved rounds", flush=True)
    time_interleaved(order, device, rounds=repeats, min_time_s=min_time_s,
                     progress=lambda msg: print(f"bench speed: {msg}", flush=True))

    b = len(noise)
    sps = lambda item: round(b / item.best_s, 3)  # noqa: E731
    ref_sps = round((sps(before) + sps(after)) / 2, 3)
    ref_mean = round((_mean_sps(before, b) + _mean_sps(after, b)) / 2, 3)
    ref_nfe = teacher.nfe(reference_steps, guidance_scale)
    teacher_rows = {key: _teacher_row(teacher, *key, sps(item), b, item) for key, item in teacher_items}
    teacher_rows[ref_key] = _teacher_row(teacher, *ref_key, ref_sps, b, before, after)
    rows = [teacher_rows[key] for key in sorted(teacher_rows, key=lambda k: (k[1], k[0]))]
    no_cfg = teacher_rows.get((reference_steps, 1.0))
    ratios, ratios_no_cfg, ratios_mean = {}, {}, {}
    for s, k, item in student_items:
        row = {"model": s.label, "source": s.source, "generator": type(s.generator).__name__, "steps": k,
               "nfe": k, "guidance_scale": float(getattr(s.generator, "guidance_scale", 1.0)),
               "samples_per_s": sps(item), "samples_per_s_mean": _mean_sps(item, b), "best_s": item.best_s,
               "calls": len(item.times_s)}
        row["speedup"] = row["samples_per_s"] / ref_sps
        row["nfe_ratio"] = ref_nfe / row["nfe"]
        row["speedup_over_nfe_ratio"] = ratios[f"{s.label}@{k}"] = \
            speedup_over_nfe_ratio(row["samples_per_s"], row["nfe"], ref_sps, ref_nfe)
        ratios_mean[f"{s.label}@{k}"] = speedup_over_nfe_ratio(row["samples_per_s_mean"], row["nfe"], ref_mean, ref_nfe)
        same = teacher_rows.get((k, 1.0))
        row["vs_teacher_same_steps"] = row["samples_per_s"] / same["samples_per_s"] if same else None
        if no_cfg is not None:
            ratios_no_cfg[f"{s.label}@{k}"] = speedup_over_nfe_ratio(row["samples_per_s"], row["nfe"],
                                                                     no_cfg["samples_per_s"], no_cfg["nfe"])
        rows.append(row)
    one_step = [v for key, v in ratios.items() if key.endswith("@1")]
    return {"batch_size": b, "repeats": repeats, "min_time_s": min_time_s, "seed": seed,
            "cfg_batching": CFG_BATCHING,
            "reference": {"model": "teacher", "steps": reference_steps, "guidance_scale": guidance_scale,
                          "nfe": ref_nfe, "samples_per_s": ref_sps, "samples_per_s_mean": ref_mean,
                          "samples_per_s_before": sps(before),
                          "samples_per_s_after": sps(after),
                          "round_samples_per_s_before": [round(b / t, 3) for t in before.round_best_s],
                          "round_samples_per_s_after": [round(b / t, 3) for t in after.round_best_s]},
            "rows": rows, "speedup_over_nfe_ratio": ratios, "speedup_over_nfe_ratio_no_cfg": ratios_no_cfg,
            "speedup_over_nfe_ratio_mean": ratios_mean,
            "criterion": {"threshold": THRESHOLD, "min_one_step_ratio": min(one_step) if one_step else None,
                          "passed": bool(one_step) and min(one_step) >= THRESHOLD}}


def speedup_over_nfe_ratio(student_sps: float, student_nfe: int, reference_sps: float, reference_nfe: int) -> float:
    """(student / reference samples/s) / (reference NFE / student NFE); 1.0 = equal cost per evaluation."""
    return (student_sps / reference_sps) / (reference_nfe / student_nfe)


def _mean_sps(item: Timed, batch_size: int) -> float:
    """Samples/s over all of an item's timed calls (unbiased between short and long calls when other
    processes share the machine, where a best-of favours the short calls that fit in quiet moments)."""
    return round(batch_size * len(item.times_s) / sum(item.times_s), 3)


def _teacher_row(teacher, steps: int, scale: float, sps: float, batch_size: int, *items: Timed) -> dict[str, Any]:
    return {"model": "teacher", "source": "teacher", "generator": "Teacher", "steps": steps,
            "nfe": teacher.nfe(steps, scale), "guidance_scale": scale, "samples_per_s": sps,
            "samples_per_s_mean": round(sum(_mean_sps(i, batch_size) for i in items) / len(items), 3),
            "cfg_batching": "2B" if scale != 1.0 else None,
            "best_s": min(i.best_s for i in items), "calls": sum(len(i.times_s) for i in items)}


# --------------------------------------------------------------------------- outputs
def render_markdown(payload: dict[str, Any]) -> str:
    """All rows (teacher, then students with their ratios), then the reference and the verdict."""
    rows = [{**r, "samples_per_s": round(r["samples_per_s"], 1)} for r in payload["rows"]]
    table = markdown_table(rows, ["model", "steps", "nfe", "guidance_scale", "samples_per_s", "speedup",
                                  "nfe_ratio", "speedup_over_nfe_ratio", "vs_teacher_same_steps"])
    ref, crit = payload["reference"], payload["criterion"]
    lines = [table, "",
             f"Reference: the teacher at {ref['steps']} steps with CFG (s = {ref['guidance_scale']:g}, NFE {ref['nfe']}; "
             f"CFG as {payload['cfg_batching']}): {ref['samples_per_s']:.4g} samples/s, the mean of "
             f"{ref['samples_per_s_before']:.4g} (timed before the students) and {ref['samples_per_s_after']:.4g} "
             "(after). `speedup` = student / reference samples/s; `speedup_over_nfe_ratio` = speedup / "
             "(reference NFE / student NFE), 1.0 the limit when every network evaluation costs the same; "
             "`vs_teacher_same_steps` = student / teacher without CFG at the same steps (the cost of the "
             "student's sampler and adapters over the plain network).", ""]
    if payload.get("speedup_over_nfe_ratio_no_cfg"):
        lines += ["Against the teacher without CFG at the same steps count as the reference: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in payload["speedup_over_nfe_ratio_no_cfg"].items()) + ".", ""]
    if payload.get("speedup_over_nfe_ratio_mean"):
        lines += ["The same ratio from mean (not best) call times, robust when other processes share the machine: "
                  + ", ".join(f"{k} {v:.3g}" for k, v in payload["speedup_over_nfe_ratio_mean"].items()) + ".", ""]
    if crit["min_one_step_ratio"] is not None:
        lines.append(f"1-step students: lowest speedup over the NFE ratio {crit['min_one_step_ratio']:.3g} "
                     f"(bar: >= {crit['threshold']}): {'passed' if crit['passed'] else 'FAILED'}.")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    """Samples/s against NFE (log-log): the teacher with and without CFG, each student's points, and
    the equal-cost-per-evaluation line through the reference."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    rows = payload["rows"]
    for scale, style, name in ((1.0, "o-", "teacher, no CFG"), (None, "s-", "teacher, CFG")):
        pts = sorted((r["nfe"], r["samples_per_s"]) for r in rows if r["model"] == "teacher"
                     and ((r["guidance_scale"] == 1.0) == (scale == 1.0)))
        if pts:
            ax.plot(*zip(*pts, strict=True), style, color="black" if scale == 1.0 else "gray", label=name)
    markers = "^vD<>pP*hXd"
    labels = list(dict.fromkeys(r["model"] for r in rows if r["model"] != "teacher"))
    for i, label in enumerate(labels):
        pts = sorted((r["nfe"], r["samples_per_s"]) for r in rows if r["model"] == label)
        ax.plot(*zip(*pts, strict=True), markers[i % len(markers)] + ":", label=label, alpha=0.8)
    ref = payload["reference"]
    nfes = sorted({r["nfe"] for r in rows})
    ax.plot(nfes, [ref["samples_per_s"] * ref["nfe"] / n for n in nfes], "--", color="tab:red", lw=0.8,
            label="equal cost per NFE (reference)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel("samples / s")
    ax.set_title(f"{payload['dataset']}: sampling speed, batch {payload['batch_size']} ({payload['device']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
