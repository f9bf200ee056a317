"""The memory accounting of ``stepdistill plan``: bytes per GPU of every role of a distillation job.

Sizes are decimal (1 GB = 10^9 bytes). ``gpu_memory=80GB`` is 80 x 10^9 bytes, about 93% of what an
"80 GB" card reports (an H100 80GB has 85.0 x 10^9): the difference covers the CUDA context and the
caching allocator's fragmentation, which the estimate does not count.

Trained roles (the generator and the critic; the LoRA / AGD adapters alone when they are adapters):

- weights: fp32 masters, 4 bytes per trained parameter;
- gradients: 4 bytes (the trainer keeps fp32 gradients: autocast's bf16 gradients are accumulated into
  the fp32 leaves; FSDP2 reduces in fp32); only the running phase's role holds them (the trainer sets
  them to None after each step), except under DDP on several GPUs, whose gradient buckets stay
  allocated for every wrapped role (with ``gradient_as_bucket_view=false`` the phase's gradients are
  a second copy);
- optimizer state: AdamW's two fp32 moments, 8 bytes; ``optim.name=adamw8bit`` (torchao): 2 bytes;
- the generator's EMA (``trainer.ema_decay`` not null): 4 bytes per generator parameter (a whole copy
  of a LoRA generator under DDP: its base at the teacher's dtype plus fp32 adapters; under FSDP only
  the trained parameters are shadowed); a consistency algorithm's target network likewise;
- the GAN head (``critic.head``) is part of the critic.

Frozen models: the teacher at ``teacher.dtype`` (fp32 4, bf16 / fp16 2 bytes per parameter),
replicated, or sharded (``teacher_placement=shard``), or offloaded (one FSDP unit, the largest block,
resident). LoRA roles train adapters on the teacher's own network: the base is counted once, with the
teacher, and shards with the trained roles under FSDP. The text encoders (fp32, as the trainer loads
them) unless ``data.cache`` is set; the VAE (fp32) when the data has real images
(``ImageCaptionData``: GAN terms, f-distill, LCM) and no cache.

Sharding: ``fsdp`` divides every trained role's weights, gradients, optimizer state and EMA by the
number of GPUs, ``hsdp`` by the GPUs of a node (``gpus_per_node``, default min(gpus, 8)), ``ddp`` by 1.

Working memory of the graded forward:

- DDP (or one process) under bf16 / fp16 autocast: autocast caches a bf16 copy of every fp32 weight
  that requires grad for the whole forward (2 bytes per trained parameter), and a frozen fp32 base
  under a LoRA role keeps its bf16 casts saved for backward (2 bytes per base parameter; none with a
  bf16 base or with checkpointing, which recomputes them);
- FSDP2 (parameters gathered in the compute dtype, gradients reduced in fp32): two gathered units
  (the current one and the prefetched next) and one unit's unsharded gradients in the compute dtype
  and in fp32: ``largest_unit x (3 c + 4)`` bytes, c the compute dtype's size.

Activations (``activations.py``): the denoiser traced on the ``meta`` device at batch 1 in the compute
dtype, with or without checkpointing, giving per sample ``T`` (peak of a graded forward + backward),
``S`` (saved by the graded forward) and ``I`` (peak of a forward without grad); at micro-batch b
(per-GPU batch / gradient accumulation) and with CFG (c = 2 teacher samples per sample, else 1):

- critic phase: ``b T`` (+ ``b S`` with the GAN's second, real-data forward);
- generator phase: ``max(b S + c b I, b T)`` (the teacher's guided forward while the generator's
  graph is held), + ``b S`` with the GAN generator term, + ``(c + 1) b S`` when gradients flow
  through the teacher's and critic's inputs (SiD's ``grad_through_scores``);
- algorithms without a critic (consistency, AGD): the generator phase alone.

LoRA roles use the full denoiser's trace (their adapters save the inputs the full layers would).
The peak is taken over the phases, and the table shows the memory at that moment.

Not modelled: the CUDA context and allocator fragmentation (see the first paragraph), the bf16 casts
of a frozen fp32 critic that the GAN generator term differentiates through, the text encoders' and
the VAE's own activations (they run before the denoisers, without grad), and a GAN head's activations.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from hydra.utils import get_object

from stepdistill.errors import StepdistillError
from stepdistill.planner.activations import Trace
from stepdistill.planner.stack import MetaStack

GB = 1e9
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "no": 4}
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
#: the rank a suggested LoRA critic / generator uses
SUGGESTED_RANK = 64


@dataclass(frozen=True)
class RoleSpec:
    """How a role trains: ``full`` (a copy of the denoiser), ``lora`` (rank, targets) or ``adapters``
    (AGD: ``adapter_parameters`` trained on the frozen base)."""

    kind: str = "full"
    rank: int | None = None
    targets: tuple[str, ...] | str | None = None
    adapter_parameters: int = 0


@dataclass(frozen=True)
class Job:
    """What the planner reads from a composed training config (see ``commands/plan.py``)."""

    gpus: int = 1
    gpus_per_node: int = 1
    gpu_memory: int = int(80 * GB)
    strategy: str = "ddp"
    teacher_placement: str = "replicate"
    checkpointing: bool = False
    bucket_view: bool = True
    mixed_precision: str = "bf16"
    teacher_dtype: str = "fp32"
    optimizers: tuple[tuple[str, str], ...] = (("critic", "adamw"), ("generator", "adamw"))
    cached: bool = False
    images: bool = False
    batch_size: int = 1
    accumulation: int = 1
    ema: bool = False
    generator: RoleSpec = field(default_factory=RoleSpec)
    critic: RoleSpec | None = field(default_factory=RoleSpec)
    head: bool = False
    head_width: int | None = None
    gan_generator: bool = False
    gan_critic: bool = False
    cfg_factor: int = 2
    grad_through_scores: bool = False
    target_network: bool = False
    resolution: tuple[int, int] | None = None
    frames: int | None = None

    @property
    def shard_degree(self) -> int:
        return {"ddp": 1, "fsdp": self.gpus, "hsdp": min(self.gpus_per_node, self.gpus)}[self.strategy]

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.gpus * self.accumulation)

    def optimizer(self, phase: str) -> str:
        return dict(self.optimizers).get(phase, "adamw")

    def check(self) -> None:
        """One-line errors for a job the trainer would refuse."""
        if self.gpus < 1:
            raise StepdistillError(f"gpus must be >= 1; got {self.gpus}")
        if self.gpus_per_node < 1:
            raise StepdistillError(f"gpus_per_node must be >= 1; got {self.gpus_per_node}")
        if self.batch_size % (self.gpus * self.accumulation):
            raise StepdistillError(f"trainer.batch_size={self.batch_size} (the global batch) must be divisible by "
                                   f"gpus ({self.gpus}) x trainer.gradient_accumulation_steps ({self.accumulation})")
        if self.strategy == "hsdp" and self.gpus % min(self.gpus_per_node, self.gpus):
            raise StepdistillError(f"trainer.strategy=hsdp: gpus={self.gpus} is not a multiple of "
                                   f"gpus_per_node={self.gpus_per_node}")
        lora = self.generator.kind != "full" or (self.critic is not None and self.critic.kind != "full")
        if self.teacher_placement == "offload" and lora:
            raise StepdistillError("trainer.teacher_placement=offload: a LoRA (or adapter) role trains on the "
                                   "teacher's own weights, which must stay on the GPU; use replicate (or shard "
                                   "with fsdp)")


@dataclass
class Row:
    """One line of the table: bytes per GPU."""

    role: str
    parameters: int = 0
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    note: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


@dataclass
class Plan:
    """The estimate: the rows at the peak phase, the per-phase totals and the parameter counts."""

    rows: list[Row]
    peak_phase: str
    phase_bytes: dict[str, float]
    parameters: dict[str, int]
    activations_per_sample: dict[str, int]
    gpu_memory: int

    @property
    def per_gpu_bytes(self) -> float:
        return sum(r.total for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.per_gpu_bytes <= self.gpu_memory

    def as_dict(self) -> dict[str, Any]:
        return {"per_gpu_bytes": int(round(self.per_gpu_bytes)), "fits": self.fits, "peak_phase": self.peak_phase,
                "phase_bytes": {k: int(round(v)) for k, v in self.phase_bytes.items()},
                "parameters": self.parameters, "activations_per_sample_bytes": self.activations_per_sample,
                "roles": [{**asdict(r), "total": r.total} for r in self.rows]}


# --------------------------------------------------------------------------- counting
def trained_parameters(stack: MetaStack, spec: RoleSpec | None) -> int:
    """What a role's optimizer updates: the whole denoiser, its LoRA adapters or AGD's adapters."""
    if spec is None:
        return 0
    if spec.kind == "lora":
        return stack.lora_parameters(int(spec.rank or 0), spec.targets)
    if spec.kind == "adapters":
        return spec.adapter_parameters
    return stack.parameters


def parameters(stack: MetaStack, job: Job) -> dict[str, int]:
    """Parameter counts per role (trained ones for the generator and the critic)."""
    head = stack.head_parameters(job.head_width) if job.critic is not None and job.head else 0
    out = {"generator": trained_parameters(stack, job.generator)}
    if job.critic is not None:
        out["critic"] = trained_parameters(stack, job.critic) + head
    out |= {"teacher": stack.parameters, "text_encoders": stack.text_encoder_parameters,
            "vae": stack.vae_parameters}
    return out


# --------------------------------------------------------------------------- the estimate
def estimate(stack: MetaStack, job: Job) -> Plan:
    """Bytes per GPU of ``job`` on ``stack`` (see the module docstring)."""
    job.check()
    counts = parameters(stack, job)
    phases = ["critic", "generator"] if job.critic is not None else ["generator"]
    trace = stack.activations(job.resolution or stack.resolution, job.frames or stack.frames,
                              COMPUTE_DTYPES[job.mixed_precision], job.checkpointing)
    by_phase = {ph: _rows(stack, job, counts, ph, trace) for ph in phases}
    totals = {ph: sum(r.total for r in rows) for ph, rows in by_phase.items()}
    peak = max(phases, key=lambda ph: totals[ph])
    per_sample = {"train_peak": trace.train_peak, "saved": trace.saved, "infer_peak": trace.infer_peak}
    return Plan(by_phase[peak], peak, totals, counts, per_sample, job.gpu_memory)


def _rows(stack: MetaStack, job: Job, counts: dict[str, int], phase: str, trace: Trace) -> list[Row]:
    d = job.shard_degree
    sharded = job.strategy in ("fsdp", "hsdp")
    ddp_buckets = job.strategy == "ddp" and job.gpus > 1
    lora_base = job.generator.kind != "full" or (job.critic is not None and job.critic.kind != "full")
    teacher_bytes = DTYPE_BYTES[job.teacher_dtype]
    rows = []
    for role, spec in (("generator", job.generator), ("critic", job.critic)):
        if spec is None:
            continue
        n = counts[role]
        grads = 4 * n / d if (ddp_buckets or role == phase) else 0.0
        if ddp_buckets and role == phase and not job.bucket_view:
            grads += 4 * n
        kind = {"lora": f"LoRA rank {spec.rank}", "adapters": "adapters"}.get(spec.kind, "full copy")
        rows.append(Row(role, n, 4 * n / d, grads, OPTIMIZER_BYTES[job.optimizer(role)] * n / d,
                        kind + (", + GAN head" if role == "critic" and job.head else "")
                        + (", gradients in DDP's buckets" if ddp_buckets else "")))
    rows += _ema_rows(stack, job, counts, d, teacher_bytes)
    teacher_params = stack.parameters
    if job.teacher_placement == "offload":
        teacher = Row("teacher", teacher_params, stack.largest_unit * teacher_bytes,
                      note="offloaded: one block resident")
    else:
        shard = job.teacher_placement == "shard" or (sharded and lora_base)
        teacher = Row("teacher", teacher_params, teacher_params * teacher_bytes / (d if shard else 1),
                      note=f"{job.teacher_dtype}" + (", sharded" if shard else "")
                      + (", the trained adapters' base" if lora_base else ""))
    rows.append(teacher)
    if not job.cached and stack.text_encoder_parameters:
        rows.append(Row("text encoders", stack.text_encoder_parameters, 4 * stack.text_encoder_parameters,
                        note="fp32; data.cache drops them"))
    if not job.cached and job.images and stack.vae_parameters:
        rows.append(Row("vae", stack.vae_parameters, 4 * stack.vae_parameters, note="fp32, encodes real images"))
    rows.append(Row("activations", weights=_activations(job, phase, trace),
                    note=f"{phase} phase, micro-batch {job.micro_batch}"
                    + (", checkpointed" if job.checkpointing else "")))
    rows.append(_working(stack, job, counts, phase))
    return rows


def _ema_rows(stack: MetaStack, job: Job, counts: dict[str, int], d: int, teacher_bytes: int) -> list[Row]:
    rows = []
    lora = job.generator.kind != "full"
    sharded = job.strategy in ("fsdp", "hsdp")
    if job.ema:
        if not lora:
            rows.append(Row("ema", counts["generator"], 4 * counts["generator"] / d, note="fp32 copy of the generator"))
        elif sharded:
            rows.append(Row("ema", counts["generator"], 4 * counts["generator"] / d, note="shadow of the adapters"))
        else:
            rows.append(Row("ema", stack.parameters + counts["generator"],
                            stack.parameters * teacher_bytes + 4 * counts["generator"],
                            note="copy of the LoRA generator with its base"))
    if job.target_network:
        rows.append(Row("target network", counts["generator"], 4 * counts["generator"],
                        note="EMA of the " + ("adapters" if lora else "generator")))
    return rows


def _activations(job: Job, phase: str, trace: Trace) -> float:
    b, c = job.micro_batch, job.cfg_factor
    train, saved, infer = b * trace.train_peak, b * trace.saved, trace.infer_peak
    if phase == "critic":
        return train + (saved if job.gan_critic else 0)
    extra = (saved if job.gan_generator else 0) + ((c + 1) * saved if job.grad_through_scores else 0)
    return max(saved + c * b * infer, train) + extra


def _working(stack: MetaStack, job: Job, counts: dict[str, int], phase: str) -> Row:
    """Memory of the graded forward's weights (module docstring): autocast's bf16 copies, or FSDP2's
    gathered units."""
    compute = DTYPE_BYTES[job.mixed_precision]
    if job.strategy in ("fsdp", "hsdp"):
        return Row("working", weights=stack.largest_unit * (3 * compute + 4),
                   note="FSDP: 2 gathered blocks + 1 block's gradients")
    if compute == 4:
        return Row("working", note="fp32 compute: no casts")
    spec = job.critic if phase == "critic" else job.generator
    trained = counts[phase]
    cached = 2 * trained
    if spec is not None and spec.kind != "full" and job.teacher_dtype == "fp32" and not job.checkpointing:
        cached += 2 * stack.parameters
    return Row("working", weights=cached, note="autocast's bf16 copies of fp32 weights")


# --------------------------------------------------------------------------- reading a config
def algorithm_setting(cfg: Any, key: str, default: Any) -> Any:
    """``algorithm.<key>`` from the config, else the algorithm class's own default, else ``default``."""
    node = cfg.get("algorithm") or {}
    if key in node:
        return node[key]
    try:
        param = inspect.signature(get_object(node["_target_"])).parameters.get(key)
    except Exception:  # noqa: BLE001 - an unimportable target: the caller's default
        return default
    return default if param is None or param.default is inspect.Parameter.empty else param.default


def with_switch(job: Job, **changes: Any) -> Job:
    return replace(job, **changes)
