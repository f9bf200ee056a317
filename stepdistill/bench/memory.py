"""``stepdistill bench memory output_dir=DIR [dataset=toy2d|digits] [experiments=[...]] [iterations=5]
[batch_size=N] [cpu=false] [jobs=1]``: peak memory and trainable parameters per experiment.

Each experiment is built exactly as ``stepdistill train`` builds it (``compose_train``,
``workflows.train.build_trainer``) in a process of its own, and
runs ``iterations`` optimizer steps, more if needed for every phase to run once (DMD2's critic
updates come first), through ``Trainer.train_step`` (the optimizers' state included). Memory:

- CPU: ``imports_rss_mib`` is the resident set after importing the libraries every experiment
  needs (torch, diffusers, accelerate, hydra; peft and transformers come with LoRA and text stacks),
  ``baseline_rss_mib`` the resident set after building (imports, teacher, generator,
  critic, optimizers; "model+imports"), ``peak_rss_mib`` the peak resident set during the training
  steps (Linux: the peak is reset after building through ``/proc/self/clear_refs``; elsewhere it is
  the process's peak, ``ru_maxrss``). One process per experiment, since a process's peak only grows
  and freed memory is not always returned to the system.
- CUDA: ``cuda_baseline_mib`` (``torch.cuda.memory_allocated`` after building) and
  ``cuda_peak_mib`` (``max_memory_allocated`` over the steps, after ``reset_peak_memory_stats``).

Parameters: ``trainable_params`` are the generator's trained parameters (all of a full copy; the
LoRA or adapter weights of ``kind`` lora / adapters), ``total_params`` all of the generator's
(a LoRA or adapter student counts the frozen base it shares with the teacher),
``trainable_share`` their ratio, ``phase_params`` every phase's trained count (critics included).

AGD trains on the teacher's guided trajectories: a first process collects a few (``trajectory_count``)
into ``output_dir/.memory_runs``, the measured one reads them. Its shard cache is then smaller than a
full run's (up to 8 shards of 256 trajectories). ``.memory_runs`` is deleted at the end.
"""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import accelerate  # noqa: F401  (the libraries every experiment imports, before the first RSS reading)
import diffusers  # noqa: F401
import torch
from accelerate.utils import set_seed
from diffusers import ModelMixin  # noqa: F401  (diffusers imports its models lazily)
from torch.profiler import ProfilerActivity, profile

from stepdistill.adapters import parameter_count
from stepdistill.algorithms.base import unwrap
from stepdistill.bench.common import (
    markdown_table,
    parse_bench_args,
    shipped_experiments,
    write_suite,
)
from stepdistill.bench.provenance import config_sha
from stepdistill.config import compose_train
from stepdistill.config import experiments as known_experiments
from stepdistill.errors import StepdistillError
from stepdistill.eval.report import pyplot
from stepdistill.lora import has_lora
from stepdistill.roles import AdapterGenerator
from stepdistill.workflows.train import build_trainer

KEYS = {"output_dir": "str", "dataset": "str", "experiments": "strs", "iterations": "int", "batch_size": "int",
        "cpu": "bool", "jobs": "int"}
#: trajectories an AGD experiment collects for the bench (one shard)
TRAJECTORY_COUNT = 16
WORK = ".memory_runs"
#: steps past ``iterations`` allowed for every phase to run once (DMD2: critic updates come first)
MAX_EXTRA_STEPS = 20
COLUMNS_CPU = ["experiment", "algorithm", "kind", "trainable_params", "total_params", "trainable_share",
               "all_phases_trainable", "batch_size", "imports_rss_mib", "baseline_rss_mib", "peak_rss_mib"]
COLUMNS_CUDA = [*COLUMNS_CPU[:-3], "cuda_baseline_mib", "cuda_peak_mib", "peak_rss_mib"]


def run(overrides: Sequence[str]) -> Path:
    """Measure every experiment in a child process; write bench_memory.json / .md / .png."""
    args = parse_bench_args(overrides, KEYS, "memory")
    dataset = args.get("dataset", "digits")
    chosen = args.get("experiments") or shipped_experiments(dataset)
    allowed = known_experiments()
    unknown = [e for e in chosen if e not in allowed]
    if unknown:
        raise StepdistillError(f"unknown experiment {unknown[0]!r}; allowed: {', '.join(allowed)}")
    iterations = int(args.get("iterations", 5))
    if iterations < 1:
        raise StepdistillError(f"iterations must be >= 1; got {iterations}")
    for key in ("batch_size", "jobs"):
        if key in args and args[key] < 1:
            raise StepdistillError(f"{key} must be >= 1; got {args[key]}")
    out = Path(args["output_dir"])
    if out.exists() and not out.is_dir():
        raise StepdistillError(f"output_dir {str(out)!r} is a file")
    work = out / WORK
    specs = [{"experiment": e, "work_dir": str(work / e.replace("/", "__")), "iterations": iterations,
              "batch_size": args.get("batch_size"), "cpu": bool(args.get("cpu")),
              "trajectories": _needs_trajectories(e)} for e in chosen]  # composed here: Hydra is not thread-safe
    try:
        rows = _measure_all(specs, int(args.get("jobs", 1)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cuda = any(r.get("cuda_peak_mib") is not None for r in rows)
    payload = {"rows": rows, "iterations": iterations, "device": "cuda" if cuda else "cpu"}
    title = (f"Peak memory of {iterations} training iterations per experiment (one process each) and the "
             "generator's trainable parameters.")
    return write_suite(out, "memory", payload, markdown_table(rows, COLUMNS_CUDA if cuda else COLUMNS_CPU),
                       plot=lambda path: plot_memory(rows, path), title=title)


def _summary(row: dict[str, Any]) -> str:
    memory = (f"CUDA peak {row['cuda_peak_mib']:.0f} MiB (after building {row['cuda_baseline_mib']:.0f})"
              if row.get("cuda_peak_mib") is not None else
              f"peak RSS {row['peak_rss_mib']:.0f} MiB (after building {row['baseline_rss_mib']:.0f})")
    return (f"{row['experiment']}: {memory}; {row['kind']} generator, {row['trainable_params']:,} of "
            f"{row['total_params']:,} parameters trainable ({100 * row['trainable_share']:.2f}%)")


# --------------------------------------------------------------------------- parent side
def _measure_all(specs: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    """Rows in ``specs`` order; ``jobs`` child processes at a time (each measures only itself, but
    parallel ones share the cores and the machine's memory: 1 for large models)."""
    if jobs == 1:
        rows = []
        for spec in specs:
            rows.append(measure(spec))
            print(_summary(rows[-1]), flush=True)
        return rows
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = list(pool.map(measure, specs))
    for row in rows:
        print(_summary(row), flush=True)
    return rows


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One experiment's row, measured in a fresh Python process (two for AGD: collect, then measure)."""
    needs = spec["trajectories"] if "trajectories" in spec else _needs_trajectories(spec["experiment"])
    if needs:
        _child(spec, collect_only=True)
    return _child(spec, collect_only=False)


def _needs_trajectories(experiment: str) -> bool:
    return compose_train([f"experiment={experiment}"]).get("trajectories") is not None


def _child(spec: dict[str, Any], collect_only: bool) -> dict[str, Any]:
    work = Path(spec["work_dir"])
    work.mkdir(parents=True, exist_ok=True)
    result = work / ("collect.json" if collect_only else "result.json")
    result.unlink(missing_ok=True)
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({**spec, "collect_only": collect_only, "result": str(result)}))
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the child imports this stepdistill
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = "import sys; from stepdistill.bench.memory import child_main; child_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, str(spec_path)], env=env, capture_output=True, text=True)
    record = json.loads(result.read_text()) if result.is_file() else None
    if record is not None and "error" in record:
        raise StepdistillError(f"{spec['experiment']}: {record['error']}")
    if proc.returncode != 0 or record is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"bench memory: measuring {spec['experiment']} failed (exit {proc.returncode}):\n{tail}")
    return record


# --------------------------------------------------------------------------- child side
def child_main(spec_path: str) -> None:
    """Entry point of the measuring process: build, (collect or) train, write the result JSON."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        record = measure_here(spec["experiment"], spec["work_dir"], spec["iterations"], spec.get("batch_size"),
                              cpu=spec.get("cpu", False), collect_only=spec.get("collect_only", False))
    except StepdistillError as e:
        record = {"error": str(e)}
    Path(spec["result"]).write_text(json.dumps(record, indent=2))


def measure_here(experiment: str, work_dir: str | Path, iterations: int, batch_size: int | None = None, *,
                 cpu: bool = False, collect_only: bool = False) -> dict[str, Any]:
    """Build ``experiment`` as training does and measure ``iterations`` steps in this process (run
    it in a fresh one: :func:`measure`)."""
    imports_rss = _mib(current_rss_kib())
    work = Path(work_dir)
    overrides = [f"experiment={experiment}", f"output_dir={work / 'run'}", f"trainer.max_steps={iterations}",
                 "trainer.checkpoint_every=0", "trainer.sample_every=0", "trainer.progress=false",
                 "logger=none", "evaluate.enabled=false"]
    if batch_size is not None:
        overrides.append(f"trainer.batch_size={int(batch_size)}")
    if cpu:
        overrides.append("trainer.cpu=true")
    cfg = compose_train(overrides)
    if cfg.get("trajectories") is not None:  # AGD: a few trajectories, in the bench's work directory
        cfg.trajectories.path = str(work / "trajectories")
        cfg.trajectories.num_trajectories = TRAJECTORY_COUNT
        cfg.trajectories.shard_size = TRAJECTORY_COUNT
        cfg.trajectories.batch_size = TRAJECTORY_COUNT
    trainer = build_trainer(cfg, work / "run")  # AGD: collects the trajectories first
    if collect_only:
        return {"collected": str(cfg.trajectories.path)}
    algorithm, trainer_cfg, accelerator = trainer.algorithm, trainer.config, trainer.accelerator
    row = {"experiment": experiment, "config_sha": config_sha(experiment), "algorithm": type(algorithm).__name__,
           **parameter_counts(trainer),
           "batch_size": int(trainer_cfg.batch_size), "iterations": int(iterations),
           "device": str(accelerator.device)}
    gc.collect()
    cuda = accelerator.device.type == "cuda"
    row["imports_rss_mib"] = imports_rss
    row["build_peak_rss_mib"] = _mib(peak_rss_kib())
    row["baseline_rss_mib"] = _mib(current_rss_kib())
    row["peak_scope"] = "training" if reset_peak_rss() else "process"
    if cuda:
        torch.cuda.synchronize()
        row["cuda_baseline_mib"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    set_seed(trainer_cfg.seed, device_specific=True)
    algorithm.train()
    start = time.perf_counter()
    phases: list[str] = []
    while len(phases) < iterations or set(phases) != set(algorithm.phases):  # every phase at least once
        if len(phases) >= iterations + MAX_EXTRA_STEPS:
            break
        phases.append(trainer.train_step(len(phases)).phase)
    if cuda:
        torch.cuda.synchronize()
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    row["step_s"] = (time.perf_counter() - start) / len(phases)
    row["steps_run"] = len(phases)
    row["peak_rss_mib"] = max(_mib(peak_rss_kib()), row["baseline_rss_mib"])
    row["phases_run"] = sorted(set(phases))
    return row


def parameter_counts(trainer: Any) -> dict[str, Any]:
    """The generator's kind, trained and total parameters, and every phase's trained count."""
    generator = unwrap(trainer.algorithm.generator)
    trained = {id(p): p for params in trainer.phase_params.values() for p in params}
    trainable = sum(p.numel() for p in generator.parameters() if id(p) in trained)
    total = parameter_count(generator)
    return {"kind": generator_kind(generator), "trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total if total else 0.0,
            "all_phases_trainable": sum(p.numel() for p in trained.values()),
            "teacher_params": parameter_count(trainer.algorithm.teacher.denoiser),
            "phase_params": {ph: sum(p.numel() for p in ps) for ph, ps in trainer.phase_params.items()}}


def generator_kind(generator: Any) -> str:
    """``adapters`` (an AdapterGenerator: guidance adapters on a frozen base), ``lora`` (LoRA layers
    in the backbone) or ``full`` (a trainable copy)."""
    generator = unwrap(generator)
    if isinstance(generator, AdapterGenerator):
        return "adapters"
    if "peft" in sys.modules:  # LoRA layers are peft's: without it imported there are none (and no import)
        if has_lora(generator.denoiser.backbone):
            return "lora"
    return "full"


# --------------------------------------------------------------------------- resident set size
def allocation_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the peak of the bytes torch's allocator held during it beyond what was live when it
    started (the profiler's memory events, in order): unlike the resident set, the same number on
    every run, and what ``torch.cuda.max_memory_allocated`` reports on a GPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def _status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def current_rss_kib() -> int:
    """This process's resident set size now (KiB); the peak where /proc is missing."""
    value = _status_kib("VmRSS")
    return value if value is not None else peak_rss_kib()


def peak_rss_kib() -> int:
    """This process's peak resident set size (KiB): VmHWM on Linux, else ``ru_maxrss``."""
    value = _status_kib("VmHWM")
    if value is not None:
        return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss // 1024 if sys.platform == "darwin" else maxrss  # bytes on macOS


def reset_peak_rss() -> bool:
    """Reset the peak resident set size to the current one (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mib(kib: int) -> float:
    return kib / 1024


# --------------------------------------------------------------------------- plot
def plot_memory(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars per experiment, stacked: imports, models built (CPU), and the training peak."""
    plt = pyplot()
    cuda = any(r.get("cuda_peak_mib") is not None for r in rows)
    base_key, peak_key = ("cuda_baseline_mib", "cuda_peak_mib") if cuda else ("baseline_rss_mib", "peak_rss_mib")
    names = [f"{r['experiment']} ({r['kind']})" for r in rows]
    imports = [0.0 if cuda else min(r.get("imports_rss_mib") or 0.0, r[base_key]) for r in rows]
    built = [r[base_key] - i for r, i in zip(rows, imports, strict=True)]
    extra = [max(r[peak_key] - r[base_key], 0.0) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    if not cuda:
        ax.barh(names, imports, color="#d9d9d9", label="imports")
    ax.barh(names, built, left=imports, color="#9ecae1", label="after building" if cuda else "models built")
    ax.barh(names, extra, left=[r[base_key] for r in rows], color="#3182bd", label="training peak")
    for i, r in enumerate(rows):
        ax.text(r[peak_key], i, f" {r[peak_key]:.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("CUDA memory allocated (MiB)" if cuda else "resident set size (MiB)")
    ax.set_title(f"stepdistill bench memory: peak of {rows[0]['iterations'] if rows else 0} training iterations")
    ax.set_xlim(0, 1.12 * max((r[peak_key] for r in rows), default=1.0))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
