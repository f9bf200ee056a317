"""The distillation training loop: one ``Accelerator``, one optimizer per phase of an ``Algorithm``.

Per optimizer step: the algorithm picks the phase; only that phase's parameters require grad (the
teacher never does); each process takes its slice of a global batch drawn from a generator seeded
by (seed, step) and splits it into ``gradient_accumulation_steps`` micro-batches; the phase's
gradients are averaged over processes (DDP), clipped and, if the loss and gradient norm are finite,
applied; the EMA of the generator follows every applied generator update. Checkpoints
(``checkpoint.py``) restore all of it, RNG states included, so a resumed run continues the same
loss trajectory.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast, set_seed
from torch import Tensor, nn

from stepdistill.algorithms.base import Algorithm, unwrap
from stepdistill.batch import Batch
from stepdistill.ema import EMA
from stepdistill.errors import StepdistillError
from stepdistill.tasks import Task
from stepdistill.training import checkpoint, sharding
from stepdistill.training.callbacks import (
    LoggerConfig,
    MetricsLog,
    Progress,
    SampleGrid,
    StepRecord,
    flat_config,
)
from stepdistill.training.checkpoint import TrainerState
from stepdistill.training.memory import apply_memory_switches
from stepdistill.training.optim import OptimConfig, build_optimizer, build_schedule
from stepdistill.training.settings import TrainerConfig, build_accelerator


@dataclass
class FitResult:
    """What ``Trainer.fit`` returns; modules are unwrapped (no DDP) and on the training device.

    Sharded runs (fsdp / hsdp): on the main process the trained roles and ``generator`` are whole
    copies gathered into CPU memory (other processes keep their shards, and the process group is gone);
    a LoRA role's copy carries its own base, no longer the teacher's.
    """

    algorithm: Algorithm
    generator: nn.Module
    ema: EMA | None
    history: list[dict[str, Any]]
    wall_s: float
    skipped_nonfinite: int
    start_step: int
    checkpoint: Path | None


class TaskBatches:
    """Global training batches of a task: ``(step, size[, rows]) -> Batch`` from a generator seeded by
    (seed, step), so every process, however many there are, draws the same global batch; ``rows``
    keeps only those rows of it (a process's share), which text tasks then encode alone."""

    def __init__(self, task: Task, seed: int = 0) -> None:
        self.task, self.seed = task, int(seed)

    def __call__(self, step: int, size: int, rows: slice = slice(None)) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + 7919 * step + 1)
        return self.task.train_batch(size, g, rows)


class Trainer:
    """Trains an ``Algorithm``; writes checkpoints, logs, samples and the student under ``output_dir``.

    Args:
        algorithm: the algorithm (teacher, generator, critic, ...), built on the CPU.
        batches: ``(step, global_size) -> Batch``, e.g. ``TaskBatches(task, seed)``.
        config: the ``trainer.*`` settings.
        optim: the ``optim.*`` settings (shared + per phase).
        output_dir: the run directory (created if missing; the command decides whether it may be reused).
        logger: trackers besides logs.jsonl (default: none).
        task: draws the sample grids (none without it).
        accelerator: an existing accelerator (default: ``build_accelerator``).
        run_config: the resolved config, for the trackers.
    """

    def __init__(self, algorithm: Algorithm, batches, config: TrainerConfig, optim: OptimConfig,
                 output_dir: str | Path, *, logger: LoggerConfig | None = None, task: Task | None = None,
                 accelerator=None, run_config: dict[str, Any] | None = None) -> None:
        self.algorithm, self.batches, self.config = algorithm, batches, config
        self.output_dir, self.logger = Path(output_dir), logger or LoggerConfig()
        self.task, self.run_config = task, run_config or {}
        self.accelerator = accelerator or build_accelerator(config, self.logger, self.output_dir)
        self._check_batch_size()
        self.sharded = config.strategy != "ddp"
        self.mesh_shape: list[int] | None = None  # sharded: (processes,) or (nodes, processes per node)
        phase_parameters(algorithm)  # freezes what no phase trains, before any sharding
        self.settings = optim.for_phases(algorithm.phases)
        algorithm.teacher.eval().requires_grad_(False)
        self.skeletons = self._shard() if self.sharded else {}  # each unit's shards go to the device
        self._place()
        self.memory = apply_memory_switches(algorithm, config, self.accelerator.device)  # training.memory
        self.phase_params = phase_parameters(algorithm)  # the live (after FSDP: sharded) parameters
        generator_ids = {id(p) for p in unwrap(algorithm.generator).parameters()}
        self.ema_phases = {ph for ph, ps in self.phase_params.items() if any(id(p) in generator_ids for p in ps)}
        self.ema = self._make_ema() if config.ema_decay is not None else None
        self.optimizers = {ph: build_optimizer(ps, self.settings[ph]) for ph, ps in self.phase_params.items()}
        self.schedules = {ph: build_schedule(opt, self.settings[ph]) for ph, opt in self.optimizers.items()}
        self.prepared = self._prepare()
        self.state = TrainerState()
        self._trainable_phase: str | None = None
        self.deadline: float | None = None  # fit(): when trainer.max_wall_s runs out
        self.out_of_time = False

    # ------------------------------------------------------------------ setup
    def _check_batch_size(self) -> None:
        n, k = self.accelerator.num_processes, self.config.gradient_accumulation_steps
        if self.config.batch_size % (n * k):
            raise StepdistillError(f"trainer.batch_size={self.config.batch_size} (the global batch) must be "
                                   f"divisible by the number of processes ({n}) x "
                                   f"trainer.gradient_accumulation_steps ({k})")

    def _place(self) -> None:
        """Everything not yet on the device goes there, but a teacher with ``teacher_placement=offload``
        stays in CPU memory (its blocks move per forward). Sharded parameters are already in place:
        nothing ever holds a whole sharded role on the device."""
        device, offload = self.accelerator.device, self.config.teacher_placement == "offload"
        for child in self.algorithm.children():
            if not (offload and child is self.algorithm.teacher):
                sharding.to_device(child, device)

    def _shard(self) -> dict[str, nn.Module]:
        """FSDP2 (``trainer.strategy=fsdp|hsdp``): shard every trained role per block, the teacher with
        ``teacher_placement=shard``, and the algorithm's untrained networks (an EMA target network);
        returns each trained role's skeleton (meta device), which the end of ``fit`` fills with gathered
        weights."""
        sharding.check_shardable(unwrap(self.algorithm.generator), self.config.strategy)
        mesh = sharding.device_mesh(self.config.strategy, self.accelerator.device)
        self.mesh_shape = list(mesh.shape)
        policy = sharding.mixed_precision_policy(self.accelerator.mixed_precision)
        trained = self.algorithm.modules_to_prepare()
        roles = {"generator": unwrap(self.algorithm.generator), **trained}
        skeletons = {name: sharding.skeleton(module) for name, module in roles.items()}
        done: set[int] = set()
        for name, module in trained.items():
            sharding.shard(module, mesh, policy, done)
            sharding.check_sharded(module, name)
        if self.config.teacher_placement == "shard":
            sharding.shard(self.algorithm.teacher, mesh, None, done, trained=False)
        for module in _untrained_state(self.algorithm, list(roles.values())).values():
            if any(p.is_floating_point() for p in module.parameters()):  # e.g. LCM's EMA target network
                sharding.shard(module, mesh, policy, done, trained=False)
        return skeletons

    def _make_ema(self):
        """The generator's EMA: a whole copy (ddp), or a shadow shard of each trained parameter (fsdp)."""
        generator = unwrap(self.algorithm.generator)
        if not self.sharded:
            return EMA(generator, self.config.ema_decay)
        trained = {id(p) for ph in self.ema_phases for p in self.phase_params[ph]}
        return sharding.ShardedEMA(generator, self.config.ema_decay, trained)

    def _prepare(self) -> dict[str, nn.Module]:
        """``accelerator.prepare`` the trained modules, optimizers and schedules (never the teacher).
        Sharded roles are not handed to accelerate (its wrappers would checkpoint rank 0's shards
        only): their optimizers and the EMA go to torch distributed checkpoint (``sharding``), the
        LR schedules (the same on every process) to accelerate's custom objects."""
        names = self.algorithm.modules_to_prepare()
        inside = {id(p) for m in names.values() for p in m.parameters()}
        for phase, params in self.phase_params.items():
            if any(id(p) not in inside for p in params):
                raise ValueError(f"phase {phase!r} trains parameters outside modules_to_prepare(); make "
                                 "trainable() return direct submodules of the algorithm")
        if self.sharded:
            return self._register_sharded(names)
        objects = [*names.values(), *self.optimizers.values(), *self.schedules.values()]
        prepared = list(self.accelerator.prepare(*objects))
        modules = dict(zip(names, prepared[:len(names)], strict=True))
        for name, module in modules.items():
            setattr(self.algorithm, name, module)
        opts = prepared[len(names):len(names) + len(self.optimizers)]
        self.optimizers = dict(zip(self.optimizers, opts, strict=True))
        self.schedules = dict(zip(self.schedules, prepared[len(names) + len(opts):], strict=True))
        stateful = _untrained_state(self.algorithm, [*names.values(), *modules.values()])
        if stateful:  # e.g. f-distill's ratio normaliser: its running means resume with the run
            self.accelerator.register_for_checkpointing(_ModuleBuffers(stateful))
        self.phase_modules = self._modules_of_phases(modules)
        return modules

    def _register_sharded(self, names: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The LR schedules go to accelerate's checkpoint; the algorithm's own state (sharded or not)
        to the sharded checkpoint with the roles (``self.untrained``)."""
        self.untrained = _untrained_state(self.algorithm, list(names.values()))
        for schedule in self.schedules.values():
            self.accelerator.register_for_checkpointing(schedule)
        self.phase_modules = self._modules_of_phases(names)
        return names

    def _modules_of_phases(self, modules: dict[str, nn.Module]) -> dict[str, list[nn.Module]]:
        ids = {ph: {id(p) for p in ps} for ph, ps in self.phase_params.items()}
        return {ph: [m for m in modules.values() if any(id(p) in ids[ph] for p in m.parameters())]
                for ph in self.phase_params}

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> StepRecord:
        """Run optimizer step ``step`` (0-based) of the phase the algorithm picks; apply it unless
        the loss or gradient norm is not finite."""
        phase = self.algorithm.phase(step)
        self._set_trainable(phase)
        micro = self._local_batches(step)
        loss, logs = self._forward_backward(phase, micro, step)
        opt, settings = self.optimizers[phase], self.settings[phase]
        lr = float(opt.param_groups[0]["lr"])
        self.accelerator.unscale_gradients(optimizer=opt)
        grad_norm = _value(_clip_or_measure(self.phase_params[phase], settings.max_grad_norm))
        if self.accelerator.num_processes > 1:
            loss = self.accelerator.reduce(loss, "mean")
        loss_value = float(loss)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self._optimizer_step(opt)
            self.schedules[phase].step()
            self.algorithm.after_step(phase, step)
            if self.ema is not None and phase in self.ema_phases:
                self.ema.update(unwrap(self.algorithm.generator))
        elif self.accelerator.scaler is not None:
            self.accelerator.scaler.update()  # fp16: clear the scaler's per-step record, lower the scale
        _unwrapped(opt).zero_grad(set_to_none=True)
        return self._account(StepRecord(step, phase, loss_value, lr, grad_norm, not finite, logs))

    def _optimizer_step(self, opt) -> None:
        """The optimizer step. Without a gradient scaler (fp16) the wrapped torch optimizer steps
        directly: accelerate 1.15's ``AcceleratedOptimizer.step`` looks the ``lomo_optim`` package up on
        disk twice per call (``importlib.util.find_spec``, ~0.3 ms each; measured with
        ``stepdistill bench overhead profile=true``) and does nothing else on one process or DDP."""
        if self.accelerator.scaler is None:
            _unwrapped(opt).step()
        else:
            opt.step()

    def _forward_backward(self, phase: str, micro: list[Batch], step: int) -> tuple[Tensor, dict[str, Any]]:
        """Loss and backward over the micro-batches (gradients averaged over them); returns the
        mean loss (detached) and the mean logs, kept as tensors so nothing waits for the device."""
        loss, logs = torch.zeros((), dtype=torch.float64, device=self.accelerator.device), {}
        for i, batch in enumerate(micro):
            with self._sync_context(phase, last=i == len(micro) - 1):
                with self.accelerator.autocast():
                    out = self.algorithm.loss(phase, batch, step)
                self.accelerator.backward(out.loss / len(micro))
            loss += out.loss.detach().double() / len(micro)
            for k, v in out.logs.items():
                v = v.detach() if isinstance(v, Tensor) else float(v)
                logs[k] = logs.get(k, 0.0) + v / len(micro)
        return loss, logs

    def _set_trainable(self, phase: str) -> None:
        """``requires_grad`` on the phase's parameters only (set again only when the phase changes)."""
        if self._trainable_phase == phase:
            return
        self._trainable_phase = phase
        if self.sharded:  # gathered weights keep the requires_grad they were gathered with
            for module in self.prepared.values():
                sharding.reshard(module)
        for params in self.phase_params.values():
            for p in params:
                p.requires_grad_(False)
        for p in self.phase_params[phase]:
            p.requires_grad_(True)

    def _local_batches(self, step: int) -> list[Batch]:
        """This process's slice of the global batch, split into micro-batches, on the device."""
        acc, device = self.accelerator, self.accelerator.device
        per_process = self.config.batch_size // acc.num_processes
        start = acc.process_index * per_process
        local = self.batches(step, self.config.batch_size, slice(start, start + per_process))
        size = per_process // self.config.gradient_accumulation_steps
        return [slice_batch(local, i * size, (i + 1) * size, device) for i in range(self.config.gradient_accumulation_steps)]

    def _sync_context(self, phase: str, last: bool):
        """DDP's no_sync on the phase's modules for every micro-batch but the last."""
        stack = contextlib.ExitStack()
        if not last:
            for module in self.phase_modules[phase]:
                stack.enter_context(sharding.no_sync(module) if self.sharded else self.accelerator.no_sync(module))
        return stack

    def _account(self, record: StepRecord) -> StepRecord:
        s = self.state
        s.history.append({"step": record.step, "phase": record.phase, "loss": record.loss})
        if not record.skipped:
            s.nonfinite_in_a_row = 0
            return record
        s.skipped_nonfinite += 1
        s.nonfinite_in_a_row += 1
        if s.nonfinite_in_a_row >= self.config.max_nonfinite_in_a_row:
            raise StepdistillError(
                f"stopped at step {record.step}: {s.nonfinite_in_a_row} steps in a row had a non-finite loss "
                f"or gradient norm (last: phase {record.phase!r}, loss {record.loss}, grad norm "
                f"{record.grad_norm}; {s.skipped_nonfinite} skipped in all); lower optim.lr / "
                f"optim.{record.phase}.lr or trainer.mixed_precision, check the teacher, then resume "
                f"from the last good checkpoint with trainer.resume=auto")
        return record

    # ------------------------------------------------------------------ the run
    def fit(self, on_start: Callable[[], None] | None = None) -> FitResult:
        """Train from the start or the resumed checkpoint to ``max_steps``; save the last
        checkpoint, the student and train.json.

        Args:
            on_start: called on the main process once the run is resumed (or seeded), before the
                first step: a failed resume leaves the run directory as it was.
        """
        start_time, acc, cfg = time.perf_counter(), self.accelerator, self.config
        self.deadline = start_time + cfg.max_wall_s if cfg.max_wall_s else None
        self._resume_or_seed()
        start_step = self.state.step
        if on_start is not None and acc.is_main_process:
            on_start()
        if self.logger.kind != "none":
            acc.init_trackers(self.logger.project, config=flat_config(self.run_config),
                              init_kwargs=self.logger.init_kwargs(self.output_dir))
        callbacks = self.make_callbacks(start_step)
        self.algorithm.train()
        last_saved = start_step if start_step else None
        finished = False
        try:
            for step in range(start_step, cfg.max_steps):
                self.run_step(step, callbacks)
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                    last_saved = self.state.step
                    self.save_checkpoint()
                if self.out_of_time:
                    break
            if last_saved != self.state.step:
                self.save_checkpoint()
            wall = time.perf_counter() - start_time
            student = self.sampling_generator()[0]
            if self.sharded and self.ema is not None:
                self.ema.model = student
            if acc.is_main_process:
                self._export(student, wall, start_step)
            wholes = self._whole_roles(student)
            finished = True
        finally:
            for cb in callbacks:
                cb.close()
            if finished:  # after an error another process may never arrive
                acc.wait_for_everyone()
            acc.end_training()
        for name, module in self.prepared.items():
            whole = wholes.get(name) if self.sharded else acc.unwrap_model(module)
            if whole is not None:
                setattr(self.algorithm, name, whole)
        return FitResult(self.algorithm, student, self.ema, self.state.history, wall,
                         self.state.skipped_nonfinite, start_step,
                         checkpoint.latest_checkpoint(self.output_dir / "checkpoints"))

    def _whole_roles(self, student: nn.Module | None) -> dict[str, nn.Module | None]:
        """Sharded: every trained role gathered whole onto the main process (None elsewhere), before
        the process group ends (the online generator is the student when there is no EMA)."""
        if not self.sharded:
            return {}
        out = {}
        for name, module in self.prepared.items():
            reuse = name == "generator" and self.ema is None
            out[name] = student if reuse else sharding.gathered(module, self.skeletons[name])
        return out

    def run_step(self, step: int, callbacks: list) -> StepRecord:
        """One iteration of the run: the optimizer step, then the callbacks (logs, progress,
        sample grids); ``fit`` and ``stepdistill bench overhead`` time exactly this."""
        record = self.train_step(step)
        self.state.step = step + 1
        self.out_of_time = self._past_deadline()
        for cb in callbacks:
            cb.after_step(record, last=step + 1 == self.config.max_steps or self.out_of_time)
        return record

    def _past_deadline(self) -> bool:
        """``trainer.max_wall_s`` spent (the main process decides for all, so all stop together)."""
        if self.deadline is None:
            return False
        past = time.perf_counter() >= self.deadline
        if self.accelerator.num_processes == 1:
            return past
        return bool(broadcast(torch.tensor([past], device=self.accelerator.device)).item())

    def make_callbacks(self, start_step: int) -> list:
        """The logs.jsonl writer, the progress bar and (with a task) the sample grids."""
        acc, cfg = self.accelerator, self.config
        out = [MetricsLog(acc, self.output_dir / "logs.jsonl", cfg.log_every, start_step),
               Progress(cfg.max_steps, start_step, cfg.progress and acc.is_main_process)]
        if self.task is not None and self.task.sample_figures:
            out.append(SampleGrid(acc, self.task, self.sampling, self.output_dir / "samples",
                                  cfg.sample_every, cfg.num_samples, cfg.seed, collective=self.sharded))
        return out

    def sampling_generator(self) -> tuple[nn.Module | None, str]:
        """The generator to export: the EMA one when enabled, else the online one. Sharded: a whole copy
        gathered from every process (all must call this) into the main process's CPU memory (None
        elsewhere)."""
        label = "EMA generator" if self.ema is not None else "generator"
        if self.sharded:
            overrides = self.ema.full() if self.ema is not None else None
            return sharding.gathered(unwrap(self.algorithm.generator), self.skeletons["generator"], overrides), label
        if self.ema is not None:
            return self.ema.model, label
        return unwrap(self.algorithm.generator), label

    @contextlib.contextmanager
    def sampling(self) -> Iterator[tuple[nn.Module, str]]:
        """The generator to sample from within the block: the EMA one when enabled. Sharded: the sharded
        generator itself with the EMA's shards swapped in (nothing gathered whole; every process must
        enter, and each runs the same sampling)."""
        if not self.sharded:
            yield self.sampling_generator()
            return
        generator = unwrap(self.algorithm.generator)
        if self.ema is None:
            yield generator, "generator"
            return
        with self.ema.swapped_in(generator):
            yield generator, "EMA generator"

    # ------------------------------------------------------------------ checkpoints and export
    def save_checkpoint(self) -> Path:
        if not self.sharded:
            return checkpoint.save_checkpoint(self.accelerator, self.output_dir / "checkpoints", self.state,
                                              self.ema, self.config.keep_last)
        return checkpoint.save_checkpoint(
            self.accelerator, self.output_dir / "checkpoints", self.state, None, self.config.keep_last,
            extra=lambda d: sharding.save_sharded(d / checkpoint.SHARDED, self._checkpointed_modules(),
                                                  self._unwrapped_optimizers(), self._phase_roots(), self.ema))

    def _checkpointed_modules(self) -> dict[str, nn.Module]:
        """What a sharded checkpoint holds besides optimizers and EMA: the trained roles and the
        algorithm's own state (an EMA target network, running statistics)."""
        return {**self.prepared, **{f"state.{n}": m for n, m in self.untrained.items()}}

    def _unwrapped_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {ph: _unwrapped(opt) for ph, opt in self.optimizers.items()}

    def _phase_roots(self) -> dict[str, nn.Module]:
        """Each phase's trained roles as one module (what ``get_optimizer_state_dict`` names the
        optimizer's parameters from)."""
        return {ph: nn.ModuleList(ms) for ph, ms in self.phase_modules.items()}

    def _resume_or_seed(self) -> None:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpoint.remove_partial(self.output_dir / "checkpoints")
        self.accelerator.wait_for_everyone()
        path = checkpoint.resolve_resume(self.config.resume, self.output_dir)
        if path is None:
            set_seed(self.config.seed, device_specific=True)  # the algorithm's noise differs per process
        elif not self.sharded:
            self.state = checkpoint.load_checkpoint(self.accelerator, path, self.ema)
        else:
            self.state = checkpoint.load_checkpoint(
                self.accelerator, path, None,
                extra=lambda d: sharding.load_sharded(d / checkpoint.SHARDED, self._checkpointed_modules(),
                                                      self._unwrapped_optimizers(), self._phase_roots(), self.ema))

    def _export(self, student: nn.Module, wall: float, start_step: int) -> None:
        checkpoint.export_student(student, self.output_dir / "student")
        final = {}  # per phase: the mean of its last 100 finite losses
        for phase in self.algorithm.phases:
            losses = [h["loss"] for h in self.state.history if h["phase"] == phase and math.isfinite(h["loss"])]
            final[phase] = sum(losses[-100:]) / len(losses[-100:]) if losses else None
        summary = {"iterations": self.state.step, "wall_s": round(wall, 2), "start_step": start_step,
                   "skipped_nonfinite": self.state.skipped_nonfinite, "final_loss": final,
                   "num_processes": self.accelerator.num_processes, "strategy": self.config.strategy,
                   "mesh": self.mesh_shape,
                   "global_batch_size": self.config.batch_size,
                   "mixed_precision": self.accelerator.mixed_precision, "ema": self.ema is not None}
        (self.output_dir / "train.json").write_text(json.dumps(summary, indent=2))


def _unwrapped(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (whose ``zero_grad`` also
    inspects the wrapped method's signature on every call)."""
    return getattr(opt, "optimizer", opt)


def _value(norm: Tensor) -> float:
    """A gradient norm as a float: a DTensor's (sharded gradients) is reduced over all ranks first."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def _clip_or_measure(params: list[nn.Parameter], max_norm: float | None) -> Tensor:
    """The gradients' total norm before clipping; clips to ``max_norm`` when set (without it, only
    measures: the non-finite guard needs the norm, and a clip to infinity would rescale by 1)."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def phase_parameters(algorithm: Algorithm) -> dict[str, list[nn.Parameter]]:
    """Each phase's trained parameters (those of ``trainable(phase)`` that require grad now);
    every other parameter of the algorithm is frozen."""
    teacher = {id(p) for p in algorithm.teacher.base_parameters()}
    out = {}
    for phase in algorithm.phases:
        params = [p for p in algorithm.parameters_of(phase) if p.requires_grad]
        if not params:
            raise ValueError(f"phase {phase!r} of {type(algorithm).__name__} trains no parameters")
        if any(id(p) in teacher for p in params):
            raise ValueError(f"phase {phase!r} of {type(algorithm).__name__} lists the teacher as trainable")
        out[phase] = params
    trained = {id(p) for ps in out.values() for p in ps}
    for p in algorithm.parameters():
        if id(p) not in trained:
            p.requires_grad_(False)
    return out


class _ModuleBuffers:
    """The buffers of an algorithm's untrained submodules, as one object ``accelerator.save_state``
    checkpoints (``register_for_checkpointing`` needs ``state_dict`` / ``load_state_dict``)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for name, m in self.modules.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for name, module in self.modules.items():
            module.load_state_dict(state[name])


def _untrained_state(algorithm: Algorithm, trained: list[nn.Module]) -> dict[str, nn.Module]:
    """The algorithm's direct submodules that hold state (buffers, or frozen parameters such as an EMA
    target network) but are neither trained (``trained``: the modules before and after ``prepare``,
    which may wrap them) nor the teacher."""
    skip = {id(m) for m in trained} | {id(algorithm.teacher)}
    return {name: child for name, child in algorithm.named_children()
            if id(child) not in skip and len(child.state_dict()) > 0}


def slice_batch(batch: Batch, start: int, stop: int, device: torch.device) -> Batch:
    cond = batch.cond.index(slice(start, stop)).to(device)
    x0 = None if batch.x0 is None else batch.x0[start:stop].to(device)
    return Batch(cond=cond, x0=x0, extras={k: v[start:stop].to(device) for k, v in batch.extras.items()})
