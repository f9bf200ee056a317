"""Which switches would make a job fit: each one alone, then a combination.

Every candidate is a config override the trainer understands, applied to the ``Job`` and estimated
again (the activation traces are memoised per stack, so this is arithmetic after the first two).
Candidates that change the recipe come last in the combination: a LoRA critic, then a LoRA generator
(different students); a smaller micro-batch with gradient accumulation keeps the global batch. A
switch the trainer would refuse with the others (e.g. offloading a LoRA role's base) costs infinity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from stepdistill.errors import StepdistillError
from stepdistill.planner.estimate import SUGGESTED_RANK, Job, RoleSpec, estimate
from stepdistill.planner.stack import MetaStack


@dataclass(frozen=True)
class Suggestion:
    """An override, the per-GPU bytes with it, and whether that fits."""

    override: str
    per_gpu_bytes: float
    fits: bool
    saves_bytes: float

    def as_dict(self) -> dict:
        return {"override": self.override, "per_gpu_bytes": int(round(self.per_gpu_bytes)), "fits": self.fits,
                "saves_bytes": int(round(self.saves_bytes))}


Candidate = tuple[str, Callable[[Job], Job], int]  # override, how it changes the job, priority group


def candidates(stack: MetaStack, job: Job) -> list[Candidate]:
    """The switches that apply to ``job`` (group 0: same recipe; 1: LoRA critic; 2: LoRA generator)."""
    out: list[Candidate] = []
    shared = job.generator.kind != "full" or (job.critic is not None and job.critic.kind != "full")
    if job.strategy == "ddp" and job.gpus > 1:
        out.append(("trainer.strategy=fsdp", lambda j: replace(j, strategy="fsdp"), 0))
        if job.gpus > job.gpus_per_node:
            out.append(("trainer.strategy=hsdp", lambda j: replace(j, strategy="hsdp"), 0))
    if job.strategy != "ddp" and job.teacher_placement == "replicate" and not shared:
        out.append(("trainer.teacher_placement=shard", lambda j: replace(j, teacher_placement="shard"), 0))
    if not job.checkpointing:
        out.append(("trainer.gradient_checkpointing=true", lambda j: replace(j, checkpointing=True), 0))
    if any(name == "adamw" for _, name in job.optimizers):
        out.append(("optim.name=adamw8bit", lambda j: replace(
            j, optimizers=tuple((ph, "adamw8bit") for ph, _ in j.optimizers)), 0))
    if job.teacher_dtype == "fp32":
        out.append(("teacher.dtype=bf16", lambda j: replace(j, teacher_dtype="bf16"), 0))
    if not job.cached:
        out.append(("data.cache=DIR", lambda j: replace(j, cached=True), 0))
    if job.teacher_placement != "offload" and not shared:
        out.append(("trainer.teacher_placement=offload", lambda j: replace(j, teacher_placement="offload"), 0))
    out += _accumulation(job)
    if job.critic is not None and job.critic.kind == "full":
        out.append((f"critic.lora_rank={SUGGESTED_RANK}",
                    lambda j: _lora(j, "critic"), 1))
    if job.generator.kind == "full":
        out.append((f"generator.lora_rank={SUGGESTED_RANK}", lambda j: _lora(j, "generator"), 2))
    return out


def _lora(job: Job, role: str) -> Job:
    job = replace(job, **{role: RoleSpec("lora", SUGGESTED_RANK, getattr(job, role).targets)})
    if job.teacher_placement == "offload":  # a shared base stays on the GPU
        job = replace(job, teacher_placement="replicate")
    if role == "generator" and job.ema:  # an EMA of a LoRA generator would copy its base
        job = replace(job, ema=False)
    return job


def _accumulation(job: Job) -> list[Candidate]:
    """A smaller micro-batch with more accumulation steps (divided by its smallest factor: halved when
    even), keeping the global batch."""
    micro = job.micro_batch
    if micro < 2:
        return []
    factor = next(f for f in range(2, micro + 1) if micro % f == 0)
    steps = job.accumulation * factor
    return [(f"trainer.gradient_accumulation_steps={steps}", lambda j: replace(j, accumulation=steps), 0)]


def suggest(stack: MetaStack, job: Job, current: float) -> tuple[list[Suggestion], Suggestion | None]:
    """Each applicable switch alone, and a greedy combination (largest saving first, recipe-changing
    switches last) that stops as soon as the job fits (None when even all of them do not fit)."""
    singles = []
    for override, change, _ in candidates(stack, job):
        total = _total(stack, change(job))
        singles.append(Suggestion(override, total, total <= job.gpu_memory, current - total))
    singles.sort(key=lambda s: -s.saves_bytes)
    return singles, _combination(stack, job, current)


def _combination(stack: MetaStack, job: Job, current: float) -> Suggestion | None:
    chosen: list[str] = []
    total = current
    while total > job.gpu_memory:
        scored = [(group, t, override, change) for override, change, group in candidates(stack, job)
                  for t in [_total(stack, change(job))] if t < total]
        if not scored:
            return None
        _, total, override, change = min(scored, key=lambda s: (s[0], s[1]))
        job = change(job)
        chosen.append(override)
    return Suggestion(" ".join(chosen), total, True, current - total) if chosen else None


def _total(stack: MetaStack, job: Job) -> float:
    try:
        return estimate(stack, job).per_gpu_bytes
    except StepdistillError:
        return float("inf")
