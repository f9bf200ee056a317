"""What every benchmark suite shares: arguments, the machine record, and the JSON / markdown / PNG
files a suite writes (``bench_<suite>.json``, ``bench_<suite>.md``, ``bench_<suite>.png``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from stepdistill.args import parse_args
from stepdistill.config import configs_dir
from stepdistill.errors import StepdistillError

DATASETS = ("toy2d", "digits")


def parse_bench_args(overrides: Sequence[str], keys: dict[str, str], suite: str) -> dict[str, Any]:
    """``key=value`` arguments of ``stepdistill bench <suite>`` typed by ``keys`` (str, int, float,
    bool, ints, strs); ``output_dir`` is required and ``dataset`` checked against :data:`DATASETS`."""
    floats = {k for k, v in keys.items() if v == "float"}
    lists = {k for k, v in keys.items() if v == "strs"}
    typed = {k: ("str" if k in floats | lists else v) for k, v in keys.items()}
    args = parse_args(overrides, typed, f"bench {suite}")
    for key in floats & args.keys():
        try:
            args[key] = float(args[key])
        except ValueError:
            raise StepdistillError(f"{key}={args[key]!r} is not a valid float") from None
    for key in lists & args.keys():
        args[key] = [v.strip() for v in str(args[key]).strip("[]").split(",") if v.strip()]
    if not args.get("output_dir"):
        raise StepdistillError(f"output_dir is required: stepdistill bench {suite} output_dir=DIR")
    dataset = args.get("dataset")
    if dataset is not None and dataset not in DATASETS:
        raise StepdistillError(f"unknown dataset {dataset!r} for `stepdistill bench {suite}`; "
                               f"allowed: {', '.join(DATASETS)}")
    return args


def shipped_experiments(dataset: str) -> list[str]:
    """The shipped experiments of ``dataset`` (``configs/experiment/<dataset>/*.yaml``), as
    ``<dataset>/<name>``, sorted."""
    folder = configs_dir() / "experiment" / dataset
    return sorted(f"{dataset}/{p.stem}" for p in folder.glob("*.yaml"))


#: name endings of shipped experiments that are variants of another (longer runs, more steps)
VARIANTS = ("_long", "_4step")


def default_experiments(dataset: str) -> list[str]:
    """One experiment per shipped algorithm setting of ``dataset``: the shipped experiments without
    the variants (``dmd2_long``, ``dmd2_4step``, ``sid_4step``: same algorithm, longer or more steps)."""
    return [e for e in shipped_experiments(dataset) if not e.endswith(VARIANTS)]


def machine() -> dict[str, Any]:
    """Where a benchmark ran: CPU, cores and threads in use, torch version, GPU (if any), date."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "gpu": gpu, "platform": platform.platform(),
            "date": datetime.date.today().isoformat()}


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine: ``2026-12-02, CPU <name> (2 cores, 2 threads), torch 2.13.0``."""
    device = f"GPU {info['gpu']}" if info.get("gpu") else \
        f"CPU {info['cpu']} ({info['cpu_cores']} cores, {_plural(info['torch_threads'], 'torch thread')})"
    return f"{info['date']}, {device}, torch {info['torch']}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) in ``columns`` order; floats with 4 significant digits,
    missing values as ``-``."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_suite(output_dir: str | Path, suite: str, payload: dict[str, Any], table: str,
                plot: Callable[[Path], None] | None = None, title: str | None = None) -> Path:
    """Write ``bench_<suite>.json`` (``payload`` plus a ``machine`` record), ``bench_<suite>.md``
    (``title``, the machine line and ``table``) and, with ``plot``, ``bench_<suite>.png`` (``plot``
    is called with the path); returns the JSON path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = payload.setdefault("machine", machine())
    path = out / f"bench_{suite}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    header = f"# stepdistill bench {suite}\n\n{title or ''}\n\n" if title else f"# stepdistill bench {suite}\n\n"
    (out / f"bench_{suite}.md").write_text(f"{header}{machine_line(info)}\n\n{table}")
    if plot is not None:
        plot(out / f"bench_{suite}.png")
    print(f"bench {suite}: {path} (+ .md{', .png' if plot else ''})")
    return path
