"""``stepdistill bench overhead dataset=toy2d|digits output_dir=DIR``: the trainer's cost per iteration
against the physical floor, a bare loop making the same model calls on the same batches.

Per experiment (one per shipped algorithm setting) two copies of the algorithm are built from the same
config and seed:

- **trainer**: stepdistill's ``Trainer`` as ``stepdistill train`` builds it (accelerate, the non-finite
  guard, loss and log bookkeeping, ``logs.jsonl``, the progress bar, the sample-grid check), timed over
  exactly what ``Trainer.fit`` runs per iteration (``Trainer.run_step``). Checkpoints and sample grids
  are off (``checkpoint_every=0``, ``sample_every=0``): they are I/O every N steps that the user sizes.
- **bare**: plain PyTorch: the phase's ``requires_grad``, the same batch (``batches(step, size)``),
  ``algorithm.loss``, ``backward``, gradient clipping when the config clips, the optimizer and LR
  schedule, ``after_step`` and the EMA update when the config has one. Everything the config asks for
  and nothing else.

The two alternate in blocks of the same steps (warm-up first), so a machine that slows down slows both;
each side's seconds per iteration is the median over its blocks, and ``ratio = trainer / bare``.
``profile=true`` also writes ``profile_<experiment>.txt`` (cProfile of one trainer block, by
cumulative time) to show where any excess goes.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stepdistill.bench.bare_loop import BareLoop
from stepdistill.bench.common import (
    default_experiments,
    markdown_table,
    parse_bench_args,
    write_suite,
)
from stepdistill.bench.provenance import config_sha
from stepdistill.bench.timing import synchronize
from stepdistill.config import compose_train, instantiate
from stepdistill.errors import StepdistillError
from stepdistill.eval.report import pyplot
from stepdistill.workflows.train import build_algorithm, build_trainer

KEYS = {"output_dir": "str", "dataset": "str", "experiments": "strs", "blocks": "int", "block_s": "float",
        "min_iterations": "int", "threads": "int", "profile": "bool"}
#: the issue's bound on trainer / bare
LIMIT = 1.10


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """Measure every experiment and write bench_overhead.json / .md / .png under ``output_dir``."""
    args = parse_bench_args(overrides, KEYS, "overhead")
    dataset = args.get("dataset", "digits")
    experiments = args.get("experiments") or default_experiments(dataset)
    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    out = Path(args["output_dir"])
    results: dict[str, Any] = {}
    for name in experiments:
        key = name.rsplit("/", 1)[-1]
        print(f"bench overhead: {name}")
        results[key] = measure(name, blocks=args.get("blocks", 5), block_s=args.get("block_s", 3.0),
                               min_iterations=args.get("min_iterations", 5),
                               profile_to=out / f"profile_{key}.txt" if args.get("profile") else None)
        row = results[key]
        print(f"  trainer {1e3 * row['trainer_s_per_it']:.2f} ms/it, bare {1e3 * row['bare_s_per_it']:.2f} "
              f"ms/it, ratio {row['ratio']:.3f}")
    payload = dict(results)
    rows = [{"algorithm": k, **v} for k, v in results.items()]
    table = markdown_table(rows, ["algorithm", "experiment", "trainer_s_per_it", "bare_s_per_it", "ratio",
                                  "iterations_per_block", "blocks"])
    write_suite(out, "overhead", payload, table, lambda path: _plot(results, path),
                title=f"Trainer vs bare loop, seconds per iteration, {dataset} (limit {LIMIT})")
    return payload


def measure(experiment: str, *, blocks: int = 5, block_s: float = 3.0, min_iterations: int = 5,
            profile_to: Path | None = None) -> dict[str, Any]:
    """Trainer and bare-loop seconds per iteration of ``experiment`` (``<dataset>/<name>``)."""
    with tempfile.TemporaryDirectory(prefix="stepdistill-overhead-") as tmp:
        trainer, callbacks, bare = _build(experiment, Path(tmp))
        try:
            step = 0
            for side in (lambda s: trainer.run_step(s, callbacks), bare):  # warm-up: allocator, caches
                _timed(side, range(step, step + min_iterations))
            step += min_iterations
            estimate = _timed(bare, range(step, step + min_iterations)) / min_iterations
            step += min_iterations
            n = max(min_iterations, int(block_s / max(estimate, 1e-6)))
            timings: dict[str, list[float]] = {"trainer": [], "bare": []}
            for _ in range(blocks):
                for name, side in (("trainer", lambda s: trainer.run_step(s, callbacks)), ("bare", bare)):
                    timings[name].append(_timed(side, range(step, step + n)) / n)
                    step += n
            if profile_to is not None:
                _profile(lambda s: trainer.run_step(s, callbacks), range(step, step + n), profile_to)
        finally:
            for cb in callbacks:
                cb.close()
            trainer.accelerator.end_training()
    t, b = statistics.median(timings["trainer"]), statistics.median(timings["bare"])
    return {"experiment": experiment, "config_sha": config_sha(experiment), "trainer_s_per_it": t, "bare_s_per_it": b, "ratio": t / b,
            "iterations_per_block": n, "blocks": blocks,
            "trainer_blocks_s_per_it": timings["trainer"], "bare_blocks_s_per_it": timings["bare"]}


def _timed(fn: Callable[[int], Any], steps: range) -> float:
    start = time.perf_counter()
    for step in steps:
        fn(step)
    synchronize("cuda" if torch.cuda.is_available() else "cpu")
    return time.perf_counter() - start


def _profile(fn: Callable[[int], Any], steps: range, path: Path) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for step in steps:
        fn(step)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


def _build(experiment: str, tmp: Path):
    """(trainer, its callbacks, the bare step function) for ``experiment``, built as
    ``stepdistill train`` builds a run, both copies from the same config and seed."""
    overrides = [f"experiment={experiment}", f"output_dir={tmp / 'run'}", "logger=none", "evaluate.enabled=false",
                 "trainer.checkpoint_every=0", "trainer.sample_every=0", "trainer.max_steps=1000000000"]
    cfg = compose_train(overrides)
    if cfg.get("trajectories") is not None:  # AGD: one shard of the teacher's trajectories is enough here
        cfg.trajectories.path = str(tmp / "trajectories")
        cfg.trajectories.num_trajectories = cfg.trajectories.shard_size
    trainer = build_trainer(cfg, tmp / "run")
    if trainer.accelerator.num_processes != 1:
        raise StepdistillError("stepdistill bench overhead runs in one process; launch it without accelerate")
    (tmp / "run").mkdir(parents=True, exist_ok=True)
    trainer.algorithm.train()
    callbacks = trainer.make_callbacks(0)
    bare = BareLoop(build_algorithm(cfg, trainer.config.seed), trainer.batches, trainer.config,
                    instantiate(cfg.optim), trainer.accelerator.device)
    return trainer, callbacks, bare


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    names = list(results)
    ratios = [results[k]["ratio"] for k in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, ratios, color=["tab:green" if r <= LIMIT else "tab:red" for r in ratios])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(LIMIT, color="tab:red", linestyle="--", linewidth=0.8, label=f"limit {LIMIT}")
    ax.set_ylim(0.9, max(1.2, max(ratios, default=1.0) + 0.05))
    ax.set_ylabel("trainer / bare loop (s per iteration)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
