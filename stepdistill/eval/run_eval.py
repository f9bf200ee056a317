"""Evaluate a distilled student against its teacher with the same code, samples and conditions.

Writes ``<run>/metrics.json`` (the schema of issue 3) and ``<run>/report.md`` with pictures; with
several noise seeds each metric is the mean of one evaluation per seed (a few-sample FID moves with
the noise drawn: on digits the same student scores 0.27-0.41 over noise draws). The
teacher's metrics (minutes on a CPU at 50 CFG steps) are cached under ``$STEPDISTILL_CACHE`` (default
``~/.cache/stepdistill``) keyed by the teacher's weights, sampler settings, sample count, task and
seed; its throughput is always measured afresh in this process, on the student's batch size.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from stepdistill.cache import cache_dir
from stepdistill.conditioning import Conditioning
from stepdistill.errors import StepdistillError
from stepdistill.guidance import parse_scale, representative_scale
from stepdistill.pipelines import sample_student
from stepdistill.roles import Generator, Teacher

Sampler = Callable[[Tensor, Conditioning], Tensor]  # (noise, cond) -> x0


def teacher_fingerprint(teacher: Teacher) -> str:
    """A hash of the teacher's weights (so a retrained teacher never reuses a stale cache)."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.denoiser.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def generate(sampler: Sampler, shape: Sequence[int], labels: Tensor, null_class: int, seed: int,
             batch_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Samples for ``labels`` in batches; noise drawn once from ``seed`` (identical for every model)."""
    noise = torch.randn(len(labels), *shape, generator=torch.Generator().manual_seed(seed))
    out = [sampler(x.to(device), Conditioning.labels(y, null_class).to(device)).cpu()
           for x, y in zip(noise.split(batch_size), labels.split(batch_size), strict=True)]
    return torch.cat(out)


@torch.no_grad()
def throughput(sampler: Sampler, shape: Sequence[int], null_class: int, batch_size: int,
               device: torch.device | str = "cpu", repeats: int = 3) -> float:
    """Samples per second on one batch (best of ``repeats`` after a warm-up)."""
    noise = torch.randn(batch_size, *shape, device=device)
    cond = Conditioning.labels(torch.zeros(batch_size, dtype=torch.long), null_class).to(device)
    sampler(noise, cond)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        sampler(noise, cond)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return batch_size / best


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def teacher_row(teacher: Teacher, task, labels: Tensor, steps: int, guidance_scale: float,
                seeds: Sequence[int], batch_size: int, device: torch.device | str = "cpu") -> dict:
    """The teacher's metrics at ``steps``: for several noise seeds their means (as ``seed_average``)."""
    per_seed = [teacher_metrics(teacher, task, labels, steps, guidance_scale, s, batch_size, device)
                for s in seeds]
    return {"steps": steps, "nfe": teacher.nfe(steps, guidance_scale), "guidance_scale": guidance_scale,
            **seed_average(per_seed, seeds)}


def teacher_metrics(teacher: Teacher, task, labels: Tensor, steps: int, guidance_scale: float, seed: int,
                    batch_size: int, device: torch.device | str = "cpu") -> dict[str, float]:
    """The teacher's metrics at ``steps`` on one seed's noise (from the cache when this exact
    evaluation ran before)."""
    key_src = json.dumps({"teacher": teacher_fingerprint(teacher), "task": task.name, "n": len(labels),
                          "labels": hashlib.sha256(labels.numpy().tobytes()).hexdigest()[:16],
                          "steps": steps, "scale": guidance_scale, "seed": seed, "sampler": "ode-v1"})
    path = cache_dir() / "teacher_eval" / (hashlib.sha256(key_src.encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        metrics = json.loads(path.read_text())["metrics"]
    else:
        sampler = teacher_sampler(teacher, steps, guidance_scale)
        samples = generate(sampler, task.sample_shape, labels, task.null_class, seed, batch_size, device)
        metrics = task.metrics(samples, labels)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": json.loads(key_src), "metrics": metrics}))
        os.replace(tmp, path)
    return metrics


def check_noise_seeds(noise_seeds: Sequence[int] | None, seed: int) -> list[int]:
    """The evaluation's noise seeds: ``noise_seeds`` (distinct integers) or else ``[seed]``."""
    seeds = [seed] if noise_seeds is None or len(noise_seeds) == 0 else [int(s) for s in noise_seeds]
    if len(set(seeds)) != len(seeds):
        raise StepdistillError(f"noise_seeds={list(noise_seeds)} repeats a seed: give distinct seeds, "
                               "e.g. [0,1,2,3]")
    return seeds


def seed_average(per_seed: list[dict[str, float]], seeds: Sequence[int]) -> dict:
    """``{"metrics": means}`` over the seeds' metrics, with ``noise_seeds`` and ``metrics_per_seed``
    when there are several."""
    if len(per_seed) == 1:
        return {"metrics": per_seed[0]}
    keys = per_seed[0].keys()
    return {"metrics": {k: sum(m[k] for m in per_seed) / len(per_seed) for k in keys},
            "noise_seeds": list(seeds), "metrics_per_seed": {k: [m[k] for m in per_seed] for k in keys}}


def teacher_sampler(teacher: Teacher, steps: int, guidance_scale: float) -> Sampler:
    return lambda noise, cond: teacher.sample(noise, cond, steps, guidance_scale=guidance_scale)


def student_samples(generator: Generator, labels: Tensor, null_class: int, steps: int, seed: int,
                    batch_size: int) -> Tensor:
    """The student's samples through the one sampling path the CLI, pipeline and export share."""
    cond = Conditioning.labels(labels, null_class).to(next(generator.parameters()).device)
    return sample_student(generator, cond, len(labels), steps, seed, batch_size=batch_size).cpu()


def evaluate_student(generator: Generator, teacher: Teacher, task, *, steps: int,
                     teacher_steps: int = 50, teacher_curve: Sequence[int] = (1, 2, 4, 8, 16, 50),
                     guidance_scale: float | None = None, num_samples: int | None = None,
                     seed: int = 0, batch_size: int = 256, grid_size: int = 500,
                     noise_seeds: Sequence[int] | None = None) -> dict:
    """Student and teacher metrics on the same labels, noise and metric code.

    With ``noise_seeds`` (several evaluations, each on noise drawn from one seed: the same for student
    and teacher) every row's metrics are the means over them, the values of each seed under
    ``metrics_per_seed`` and the seeds under ``noise_seeds``; pictures come from the first seed.

    Returns:
        {"student": row, "teacher": row, "teacher_curve": [rows], "reference": {...} | None,
         "pictures": {name: samples [grid_size, ...]}, "picture_labels": labels [grid_size]}
    """
    seeds = check_noise_seeds(noise_seeds, seed)
    seed = seeds[0]
    # a random-scale (range) teacher is compared at the middle of its range
    scale = representative_scale(teacher.guidance_scale if guidance_scale is None else parse_scale(guidance_scale))
    labels = task.eval_labels(num_samples)
    generator = generator.eval()
    device = next(generator.parameters()).device
    teacher = teacher.to(device)  # both on the student's device: same-place samples and speeds
    start = time.perf_counter()
    x_student = student_samples(generator, labels, task.null_class, steps, seed, batch_size)
    wall = time.perf_counter() - start
    student = lambda noise, cond: generator.sample(noise, cond, steps)  # noqa: E731 (throughput only)
    per_seed = [task.metrics(x_student, labels)] + [
        task.metrics(student_samples(generator, labels, task.null_class, steps, s, batch_size), labels)
        for s in seeds[1:]]
    s_row = {"steps": steps, "nfe": steps, **seed_average(per_seed, seeds),
             # best of 10: a one-step batch takes ~0.1 s on a CPU, so single timings are noisy
             "samples_per_s": round(throughput(student, task.sample_shape, task.null_class, batch_size,
                                               device, repeats=10), 1),
             "sampling_wall_s": round(wall, 2)}
    teacher_fn = teacher_sampler(teacher, teacher_steps, scale)
    t_row = teacher_row(teacher, task, labels, teacher_steps, scale, seeds, batch_size, device)
    t_row["samples_per_s"] = round(throughput(teacher_fn, task.sample_shape, task.null_class,
                                              batch_size, device, repeats=1), 1)
    speed = speed_vs_cfg_teacher(teacher, task, s_row, t_row, teacher_steps, scale, batch_size, device)
    curve = [teacher_row(teacher, task, labels, k, scale, seeds, batch_size, device) for k in teacher_curve]
    shown = labels[:grid_size]  # the picture: teacher and student on the same noise and labels
    pictures = {f"teacher {teacher_steps} steps": generate(teacher_fn, task.sample_shape, shown,
                                                           task.null_class, seed, batch_size, device),
                f"student {steps} step{'s' if steps > 1 else ''}": x_student[:grid_size]}
    return {"student": s_row, "teacher": t_row, "teacher_curve": curve, "reference": task.reference(labels),
            "speed": speed, "pictures": pictures, "picture_labels": shown}


#: the CFG scale of the speed comparison when the teacher's own scale is 1 (any s != 1 costs two passes)
SPEED_CFG_SCALE = 2.0


def speed_vs_cfg_teacher(teacher: Teacher, task, s_row: dict, t_row: dict, steps: int, scale: float,
                         batch_size: int, device) -> dict:
    """The student's sampling speedup over the teacher at ``steps`` steps WITH classifier-free
    guidance (two network passes per step), divided by their NFE ratio (1.0 = the ideal: each network
    evaluation costs the same; below 1 the student's sampler has overhead). Same batch, same process."""
    cfg_scale = scale if scale != 1.0 else SPEED_CFG_SCALE
    if cfg_scale == scale:
        cfg_sps = t_row["samples_per_s"]
    else:
        cfg_sps = round(throughput(teacher_sampler(teacher, steps, cfg_scale), task.sample_shape, task.null_class,
                                   batch_size, device, repeats=1), 1)
    nfe = teacher.nfe(steps, cfg_scale)
    speedup = s_row["samples_per_s"] / cfg_sps
    return {"batch_size": batch_size, "device": str(device),
            "teacher_cfg": {"steps": steps, "guidance_scale": cfg_scale, "nfe": nfe, "samples_per_s": cfg_sps},
            "speedup": round(speedup, 1), "nfe_ratio": nfe / s_row["nfe"],
            "speedup_over_nfe_ratio": round(speedup / (nfe / s_row["nfe"]), 3)}
