"""CFG-guided teacher trajectories on disk, for adapter guidance distillation (AGD).

AGD trains on the teacher's *guided* trajectories, not on noised data (Jensen et al. 2025, Sec. 3.3):
for each trajectory a CFG scale w is drawn from [w_min, w_max], the teacher samples with CFG at w, and
every step stores (x_t, t, condition, w, guided output in the teacher's own parameterization).

Storage: ``manifest.json`` (the settings; a directory is only resumed with the same ones),
``null.safetensors`` (the unconditional prompt embedding, text models), and ``shard-XXXXX.safetensors``,
each holding ``shard_size`` whole trajectories in float16 (labels / prompt embeddings once per
trajectory). A shard is collected in memory, written to a temporary name and renamed, so memory does
not grow with the number of trajectories and an interrupted collection resumes at the first missing
shard; shard i's noise, scales and conditions come from a generator seeded by (seed, i), so a resumed
collection neither duplicates nor loses trajectories.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from stepdistill.batch import Batch
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.roles import Teacher
from stepdistill.sampling import ode_sample
from stepdistill.schedules import Prediction

MANIFEST, NULL = "manifest.json", "null.safetensors"
#: per-record tensors (one row per step of a trajectory) and per-trajectory condition tensors
RECORD_KEYS = ("x_t", "t", "scale", "target", "trajectory")
CONDITION_KEYS = ("class_labels", "prompt_embeds", "pooled_embeds", "time_ids")


@dataclass
class TrajectorySettings:
    """What to collect (the ``trajectories`` config node).

    Args:
        path: the directory (created; resumed when it holds the same settings).
        num_trajectories: trajectories to collect (rounded up to whole shards).
        steps: teacher ODE steps per trajectory (one record each).
        w_min / w_max: the CFG scale range, s in ``u + s (c - u)`` (the paper: [1, 6] class-conditional).
        shard_size: trajectories per shard file.
        batch_size: trajectories sampled at once.
        seed: seed of the noise, scales and conditions.
    """

    path: str
    num_trajectories: int = 1024
    steps: int = 50
    w_min: float = 1.0
    w_max: float = 6.0
    shard_size: int = 128
    batch_size: int = 64
    seed: int = 0

    @property
    def num_shards(self) -> int:
        return -(-int(self.num_trajectories) // int(self.shard_size))

    def fingerprint(self) -> dict:
        """The settings a resumed (or extended: more trajectories) collection must share."""
        d = asdict(self)
        for key in ("path", "batch_size", "num_trajectories"):
            d.pop(key)
        return d


def shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.safetensors"


def disk_size(root: Path) -> int:
    """Bytes of the files under ``root`` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0


def collect_trajectories(teacher: Teacher, conditions: Callable[[int, int], Conditioning],
                         settings: TrajectorySettings, *, progress: bool = True) -> dict:
    """Collect the missing shards of ``settings.path`` with ``teacher`` (CFG at a per-trajectory scale).

    Args:
        conditions: ``(shard_index, n) -> Conditioning`` of n trajectories (the same for the same index).
    Returns:
        ``{"shards", "collected", "bytes_before", "bytes_after"}``.
    """
    root = Path(settings.path)
    before = disk_size(root)
    _check_manifest(root, settings)
    todo = [i for i in range(settings.num_shards) if not shard_path(root, i).is_file()]
    print(f"trajectories in {root}: {settings.num_shards - len(todo)} of {settings.num_shards} shards present, "
          f"{before / 2**20:.1f} MiB on disk")
    iterator = todo
    if progress and todo:
        iterator = tqdm(todo, desc="collecting trajectories", unit="shard")
    for index in iterator:
        _write_shard(root, index, _collect_shard(teacher, conditions, settings, index))
    after = disk_size(root)
    print(f"trajectories in {root}: {settings.num_shards} shards, {after / 2**20:.1f} MiB on disk")
    return {"shards": settings.num_shards, "collected": len(todo), "bytes_before": before, "bytes_after": after}


def _check_manifest(root: Path, settings: TrajectorySettings) -> None:
    wanted = settings.fingerprint()
    manifest = root / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if diff:
            raise StepdistillError(f"{str(root)!r} holds trajectories collected with other settings {diff} "
                                   "(found, wanted): choose another trajectories.path or delete that directory")
        return
    if root.is_dir() and any(root.glob("shard-*.safetensors")):
        raise StepdistillError(f"{str(root)!r} holds shards but no {MANIFEST}: delete it or choose another path")
    root.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(wanted, indent=2))


def _collect_shard(teacher: Teacher, conditions: Callable[[int, int], Conditioning],
                   settings: TrajectorySettings, index: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(int(settings.seed) * 1_000_003 + index)
    n = int(settings.shard_size)
    cond = conditions(index, n)
    scales = settings.w_min + (settings.w_max - settings.w_min) * torch.rand(n, generator=g, dtype=torch.float64)
    device = next(teacher.parameters()).device
    noise = torch.randn((n, *teacher.denoiser.sample_shape), generator=g)
    parts = []
    for start in range(0, n, int(settings.batch_size)):
        rows = slice(start, min(n, start + int(settings.batch_size)))
        parts.append(_trajectories(teacher, noise[rows].to(device), cond.index(rows).to(device),
                                   scales[rows].to(device), settings.steps, offset=start))
    records = {k: torch.cat([p[k] for p in parts]) for k in RECORD_KEYS}
    records.update({k: getattr(cond, k).cpu() for k in CONDITION_KEYS if getattr(cond, k) is not None})
    if cond.prompt_embeds is not None:
        records["prompt_embeds"] = records["prompt_embeds"].half()
        if cond.pooled_embeds is not None:
            records["pooled_embeds"] = records["pooled_embeds"].half()
    _save_null(Path(settings.path), cond)
    return records


@torch.no_grad()
def _trajectories(teacher: Teacher, noise: Tensor, cond: Conditioning, scales: Tensor, steps: int,
                  offset: int) -> dict[str, list | Tensor]:
    """One batch of guided teacher trajectories, one record per (trajectory, step)."""
    native = teacher.denoiser.prediction
    schedule = teacher.schedule
    out: dict[str, list[Tensor]] = {k: [] for k in RECORD_KEYS}
    ids = torch.arange(offset, offset + len(noise), dtype=torch.int32)

    def record(x: Tensor, t: Tensor) -> Tensor:
        guided = teacher.predict(x, t, cond, out=native, guidance_scale=scales)
        for key, value in (("x_t", x.half()), ("t", t.float()), ("scale", scales.float()),
                           ("target", guided.half()), ("trajectory", ids)):
            out[key].append(value.cpu())
        return schedule.convert(guided, x, t, native, Prediction.X0).to(x.dtype)

    ode_sample(record, schedule, noise, int(steps))
    return {k: torch.stack(v, 1).flatten(0, 1) for k, v in out.items()}  # trajectory-major rows


def _write_shard(root: Path, index: int, tensors: dict[str, Tensor]) -> None:
    final = shard_path(root, index)
    tmp = final.with_name(f".{final.name}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, final)


def _save_null(root: Path, cond: Conditioning) -> None:
    null = {"null_class": torch.tensor([-1 if cond.null_class is None else cond.null_class])}
    if cond.null_prompt_embeds is not None:
        null["null_prompt_embeds"] = cond.null_prompt_embeds.cpu().contiguous()
    if cond.null_pooled_embeds is not None:
        null["null_pooled_embeds"] = cond.null_pooled_embeds.cpu().contiguous()
    if not (root / NULL).is_file():
        tmp = root / f".{NULL}.tmp"
        save_file(null, str(tmp))
        os.replace(tmp, root / NULL)


# ----------------------------------------------------------------------------- training batches
class TrajectoryBatches:
    """Training batches from stored trajectories: ``(step, size[, rows]) -> Batch``.

    Each step draws ``shards_per_batch`` shards and then records within them, from a generator
    seeded by (seed, step): every process draws the same global batch, and a resumed run the same
    batches as an uninterrupted one. At most ``cache_shards`` shards are held in memory; only the
    first ``num_shards`` (default: all) are used.
    ``Batch.extras`` holds ``x_t``, ``t``, ``scale`` and ``target`` (float32); ``Batch.cond`` the
    conditions (with their null condition, for the adapters' condition embedding).
    """

    def __init__(self, path: str | Path, seed: int = 0, shards_per_batch: int = 4, cache_shards: int = 8,
                 num_shards: int | None = None) -> None:
        self.root = Path(path)
        self.shards = sorted(self.root.glob("shard-*.safetensors"))[:num_shards]
        if not self.shards:
            raise StepdistillError(f"no trajectory shards in {str(self.root)!r}: collect them first "
                                   "(`stepdistill train` with a `trajectories` node does)")
        self.seed, self.per_batch, self.cache_size = int(seed), int(shards_per_batch), int(cache_shards)
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._null = self._load(self.root / NULL) if (self.root / NULL).is_file() else {}

    def __call__(self, step: int, size: int, rows: slice = slice(None)) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + 7919 * step + 2)
        chosen = torch.randint(len(self.shards), (min(self.per_batch, size),), generator=g)
        which = chosen[torch.randint(len(chosen), (size,), generator=g)][rows]
        position = torch.rand(size, generator=g, dtype=torch.float64)[rows]  # where in the shard
        parts, order = [], []
        for s in which.unique(sorted=True):
            at = (which == s).nonzero()[:, 0]
            parts.append(self._rows(int(s), position[at]))
            order.append(at)
        merged = _merge(parts, self._null)
        return _reorder(merged, torch.argsort(torch.cat(order)))

    def _rows(self, index: int, position: Tensor) -> dict[str, Tensor]:
        shard = self._shard(index)
        pick = (position * len(shard["t"])).long().clamp_max(len(shard["t"]) - 1)
        out = {k: shard[k][pick] for k in ("x_t", "t", "scale", "target")}
        traj = shard["trajectory"][pick].long()
        out.update({k: shard[k][traj] for k in CONDITION_KEYS if k in shard})
        return out

    def _shard(self, index: int) -> dict[str, Tensor]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        self._cache[index] = self._load(self.shards[index])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return self._cache[index]

    @staticmethod
    def _load(path: Path) -> dict[str, Tensor]:
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise StepdistillError(f"unreadable trajectory shard {str(path)!r} (corrupt? delete it and collect "
                                   f"again): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _merge(parts: list[dict[str, Tensor]], null: dict[str, Tensor]) -> Batch:
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    extras = {k: cat.pop(k).float() for k in ("x_t", "t", "scale", "target")}
    extras["t"] = extras["t"].double()
    null_class = int(null["null_class"][0]) if "null_class" in null and int(null["null_class"][0]) >= 0 else None
    cond = Conditioning(class_labels=cat.get("class_labels"),
                        prompt_embeds=cat["prompt_embeds"].float() if "prompt_embeds" in cat else None,
                        pooled_embeds=cat["pooled_embeds"].float() if "pooled_embeds" in cat else None,
                        time_ids=cat.get("time_ids"), null_class=null_class,
                        null_prompt_embeds=null.get("null_prompt_embeds"),
                        null_pooled_embeds=null.get("null_pooled_embeds"),
                        batch_size=len(extras["t"]))
    return Batch(cond=cond, extras=extras)


def _reorder(batch: Batch, index: Tensor) -> Batch:
    return Batch(cond=batch.cond.index(index), x0=None, extras={k: v[index] for k, v in batch.extras.items()})
