"""The GPU check of issue 21 (section 5): DMD2 at real size on one GPU, measured against the planner.

    python scripts/gpu_check.py [--out gpu_check.json] [--iterations 6] [--jobs NAME,...] [--max-seconds 420]
    python scripts/gpu_check.py --dry-run [--out FILE]      # the same code on the CPU, on the tiny SD stack

Each job is DMD2 as ``stepdistill train`` builds it (the shipped experiment's recipe, the ``Trainer``
with its strategy and memory switches) with a denoiser of random weights built from a config on the
device (the SD1.5- and SDXL-size UNets of ``stepdistill.planner.presets``; no download), synthetic
prompt embeddings instead of text encoders (``data.cache=synthetic`` for the planner), one critic
update per generator update, bf16 autocast. Jobs: SD1.5 with and without gradient checkpointing,
FSDP2 on one GPU (a process group of one), xformers where it imports; SDXL (a bf16 teacher and a LoRA
critic, to fit one 80 GB card) with and without checkpointing and with FSDP. A job the planner says
does not fit the card is skipped and recorded as such.

Writes JSON: per job the median seconds per iteration of each phase (after each phase's first step),
``torch.cuda.max_memory_allocated`` over building and training (CPU: the growth of the peak resident
set), the planner's per-GPU estimate for the same job and their ratio; with xformers, the largest
difference between SDPA's and xformers' outputs of one UNet forward. About 5 minutes on an H100.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from stepdistill.algorithms.base import Batch
from stepdistill.commands.plan import plan
from stepdistill.conditioning import Conditioning
from stepdistill.config import instantiate
from stepdistill.denoisers.loading import (
    cast_base_weights,
    load_schedule,
    schedule_from_config,
    teacher_dtype,
    wrap_backbone,
)
from stepdistill.planner.config import PlanArgs, compose_job_config, split_args
from stepdistill.planner.presets import Component, preset
from stepdistill.planner.stack import MetaStack
from stepdistill.roles import Teacher
from stepdistill.training.trainer import Trainer

#: (name, planner arguments + training overrides) on a GPU
_SD15 = ["experiment=sd15/dmd2", "backbone=sd15", "trainer.batch_size=4", "trainer.strategy=ddp",
         "trainer.gradient_checkpointing=false"]
_SDXL = ["experiment=sdxl/dmd2", "backbone=sdxl", "trainer.batch_size=1", "teacher.dtype=bf16", "critic.lora_rank=64",
         "trainer.strategy=ddp", "trainer.gradient_checkpointing=false"]
GPU_JOBS: list[tuple[str, list[str]]] = [
    ("sd15", _SD15),
    ("sd15_checkpointing", [*_SD15, "trainer.gradient_checkpointing=true"]),
    ("sd15_fsdp", [*_SD15, "trainer.strategy=fsdp"]),
    ("sd15_xformers", [*_SD15, "trainer.attention=xformers"]),
    ("sdxl_lora_critic", _SDXL),
    ("sdxl_lora_critic_checkpointing", [*_SDXL, "trainer.gradient_checkpointing=true"]),
    ("sdxl_fsdp_checkpointing", [*_SDXL, "trainer.strategy=fsdp", "trainer.gradient_checkpointing=true"]),
]
#: the dry run: the tiny SD1.5 stack on the CPU, fp32
_TINY = ["experiment=tiny_sd/dmd2", "trainer.batch_size=2", "trainer.strategy=ddp",
         "trainer.gradient_checkpointing=false"]
CPU_JOBS: list[tuple[str, list[str]]] = [
    ("tiny_sd15", _TINY),
    ("tiny_sd15_checkpointing", [*_TINY, "trainer.gradient_checkpointing=true"]),
]
#: what every job sets (a short run that writes nothing and alternates the phases)
COMMON = ["algorithm.critic_updates_per_generator_update=1", "trainer.ema_decay=null", "trainer.progress=false",
          "data.cache=synthetic"]
_SD_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return torch.cuda.is_available()


def backbone_component(plan_args: PlanArgs, cfg: Any) -> tuple[Component, int]:
    """The denoiser's class and config (the preset's, or the teacher directory's) and its text length."""
    if plan_args.backbone:
        chosen = preset(plan_args.backbone)
        return chosen.backbone, chosen.text_tokens
    stack = MetaStack.from_dir(cfg.teacher.path)
    return Component("diffusers", stack.class_name, dict(stack.backbone.config)), stack.text_tokens


def build_backbone(component: Component, device: torch.device) -> torch.nn.Module:
    """The denoiser with random weights, built from its config directly on ``device``."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        return getattr(diffusers, component.class_name).from_config(component.config)


def synthetic_batches(backbone: torch.nn.Module, tokens: int):
    """``(step, size, rows) -> Batch`` of random prompt embeddings shaped as the pipeline's."""
    c = backbone.config
    text_time = c.get("addition_embed_type") == "text_time"
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim if text_time else None

    def batches(step: int, size: int, rows: slice = slice(None)) -> Batch:
        g = torch.Generator().manual_seed(step)
        embeds = torch.randn(size, tokens, c.cross_attention_dim, generator=g)[rows]
        kw: dict[str, Any] = {"prompt_embeds": embeds,
                              "null_prompt_embeds": torch.zeros(1, tokens, c.cross_attention_dim)}
        if text_time:
            side = c.sample_size * 8
            kw |= {"pooled_embeds": torch.randn(size, pooled, generator=g)[rows],
                   "null_pooled_embeds": torch.zeros(1, pooled),
                   "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * len(embeds), dtype=torch.float32)}
        return Batch(cond=Conditioning(**kw), x0=None)

    return batches


def build_trainer(args: list[str], device: torch.device, out: Path) -> tuple[Trainer, dict[str, Any]]:
    """The job's ``Trainer`` (as ``workflows.train.build_algorithm``, with a random-weight teacher)."""
    plan_args, overrides = split_args(args)
    cfg = compose_job_config(plan_args, overrides)
    component, tokens = backbone_component(plan_args, cfg)
    backbone = build_backbone(component, device)
    schedule = schedule_from_config(_SD_SCHEDULER) if plan_args.backbone else load_schedule(cfg.teacher.path)
    teacher = Teacher(wrap_backbone(backbone, schedule), guidance_scale=cfg.teacher.guidance_scale)
    generator = instantiate(cfg.generator, denoiser=teacher.denoiser)
    critic = instantiate(cfg.critic, denoiser=teacher.denoiser)
    cast_base_weights(teacher, teacher_dtype(cfg))
    algorithm = instantiate(cfg.algorithm, teacher=teacher, generator=generator, critic=critic)
    trainer = Trainer(algorithm, synthetic_batches(backbone, tokens), instantiate(cfg.trainer), instantiate(cfg.optim),
                      out)
    return trainer, {"experiment": cfg.get("experiment_name")}


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from stepdistill.bench.memory import peak_rss_kib

    return peak_rss_kib() * 1024


def reset_peak(device: torch.device) -> int:
    """Reset the peak counter; returns the baseline the peak is measured from."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    from stepdistill.bench.memory import current_rss_kib, reset_peak_rss

    reset_peak_rss()
    return current_rss_kib() * 1024


def run_job(name: str, args: list[str], device: torch.device, iterations: int, memory_bytes: int,
            out: Path) -> dict[str, Any]:
    precision = "bf16" if device.type == "cuda" else "no"
    on_cpu = str(device.type == "cpu").lower()
    full = [*args, *COMMON, f"trainer.mixed_precision={precision}", f"trainer.cpu={on_cpu}"]
    estimate = plan([*full, "gpus=1", f"gpu_memory={memory_bytes / 1e9:.3f}GB"])
    row: dict[str, Any] = {"name": name, "overrides": full, "planner_bytes": estimate["per_gpu_bytes"],
                           "planner_fits": estimate["fits"], "planner_roles": estimate["roles"]}
    if not estimate["fits"]:
        return {**row, "status": "skipped: the planner says it does not fit this device"}
    if "trainer.attention=xformers" in args and not xformers_available():
        return {**row, "status": "skipped: xformers does not import here"}
    base = reset_peak(device)
    trainer, info = build_trainer(full, device, out / name)
    times: dict[str, list[float]] = {}
    for step in range(iterations):
        _sync(device)
        start = time.perf_counter()
        record = trainer.train_step(step)
        _sync(device)
        times.setdefault(record.phase, []).append(time.perf_counter() - start)
    measured = peak_bytes(device) - base
    trainer.accelerator.free_memory()
    del trainer
    gc.collect()
    per_phase = {ph: statistics.median(ts[1:] or ts) for ph, ts in times.items()}
    return {**row, **info, "status": "ran", "iterations": iterations, "seconds_per_iteration": per_phase,
            "peak_bytes": measured, "peak_measure": "cuda max_memory_allocated" if device.type == "cuda"
            else "peak RSS growth", "measured_over_planner": measured / estimate["per_gpu_bytes"]}


def attention_parity(device: torch.device) -> dict[str, Any]:
    """One SD1.5-size UNet forward with SDPA and with xformers (bf16): the largest difference."""
    from stepdistill.kernels.attention import set_model_attention

    unet = build_backbone(preset("sd15").backbone, device).to(torch.bfloat16)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 4, 64, 64, device=device, dtype=torch.bfloat16, generator=g)
    text = torch.randn(2, 77, 768, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.tensor([500, 500], device=device)
    with torch.no_grad():
        reference = unet(x, t, encoder_hidden_states=text).sample.float()
        set_model_attention(unet, "xformers", device)
        other = unet(x, t, encoder_hidden_states=text).sample.float()
    return {"max_abs_diff": float((reference - other).abs().max()), "reference_abs_mean": float(reference.abs().mean())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written (default gpu_check.json)")
    parser.add_argument("--iterations", type=int, default=6, help="optimizer steps per job (phases alternate)")
    parser.add_argument("--jobs", default="", help="comma-separated job names (default: all)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="the tiny SD stack on the CPU (what CI runs)")
    parser.add_argument("--max-seconds", type=float, default=420.0, help="skip the jobs left after this long")
    parser.add_argument("--work-dir", default="gpu_check_runs", help="where the trainers may write")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    jobs = CPU_JOBS if device.type == "cpu" else GPU_JOBS
    if args.jobs:
        wanted = args.jobs.split(",")
        jobs = [j for j in jobs if j[0] in wanted]
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else int(16e9)
    start = time.perf_counter()
    rows = []
    for name, job_args in jobs:
        if time.perf_counter() - start > args.max_seconds:
            rows.append({"name": name, "status": f"skipped: --max-seconds {args.max_seconds:g} reached"})
            continue
        rows.append(run_job(name, job_args, device, args.iterations, memory, Path(args.work_dir)))
        print(json.dumps({k: rows[-1].get(k) for k in ("name", "status", "seconds_per_iteration", "peak_bytes",
                                                        "planner_bytes")}), flush=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "device_memory_bytes": memory, "torch": torch.__version__, "jobs": rows,
              "attention_parity": attention_parity(device) if xformers_available() else None,
              "total_seconds": time.perf_counter() - start}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
