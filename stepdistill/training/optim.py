"""Optimizer and learning-rate schedule of each phase: AdamW with a linear warmup.

One ``OptimConfig`` holds the settings every phase shares; ``optim.<phase>.<key>`` overrides one
key for one phase (``null`` keeps the shared value), so ``optim.critic.lr=1e-3`` gives the critic its
own learning rate. The builders are plain functions so a config can point at them with ``_target_``.

``optim.name``: ``adamw`` (``torch.optim.AdamW``) or ``adamw8bit``: torchao's ``AdamW8bit`` (the
optional extra ``pip install 'stepdistill[8bit]'``), whose two moments are kept as 8-bit block-wise
quantized tensors (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"; blocks of
256 values, each with an fp32 scale): about 2 bytes per parameter instead of AdamW's 8, for tensors of
at least 4096 values (smaller ones keep fp32 moments). Its update is AdamW's, computed in fp32 by a
``torch.compile``d kernel (on a CPU that needs a C++ compiler; the first step compiles it for each
parameter shape: about a minute for the first on 2 cores with a cold cache, seconds after), on CPU and
CUDA, and it shards with FSDP2 (DTensor parameters). Its state round-trips through
``accelerator.save_state`` / ``load_state`` like AdamW's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from stepdistill.errors import StepdistillError


@dataclass(frozen=True)
class PhaseOptim:
    """The optimizer settings of one phase.

    Attributes:
        lr: AdamW learning rate after warmup.
        betas: AdamW (beta1, beta2).
        eps: AdamW epsilon.
        weight_decay: decoupled weight decay.
        warmup_steps: linear warmup length, in this phase's own optimizer updates.
        max_grad_norm: gradient clipping threshold (None or 0: no clipping; the norm is still
            computed for the non-finite guard and the logs).
        name: the optimizer, one of ``OPTIMIZERS`` (``adamw8bit`` needs the ``8bit`` extra).
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float | None = 10.0
    name: str = "adamw"

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise StepdistillError(f"optim.name={self.name!r} is not an optimizer; allowed: {', '.join(OPTIMIZERS)}")
        if self.name == "adamw8bit" and importlib.util.find_spec("torchao") is None:
            raise StepdistillError(MISSING_8BIT)
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise StepdistillError(f"optim.betas must be two numbers in [0, 1); got {list(self.betas)}")
        if float(self.lr) <= 0 or int(self.warmup_steps) < 0 or float(self.weight_decay) < 0:
            raise StepdistillError(f"optim.lr must be > 0, optim.warmup_steps and optim.weight_decay "
                                   f">= 0; got lr={self.lr}, warmup_steps={self.warmup_steps}, "
                                   f"weight_decay={self.weight_decay}")
        object.__setattr__(self, "betas", betas)


#: ``optim.name`` values
OPTIMIZERS = ("adamw", "adamw8bit")
#: the error for ``optim.name=adamw8bit`` without torchao
MISSING_8BIT = ("optim.name=adamw8bit needs torchao (the '8bit' extra): pip install 'stepdistill[8bit]' "
                "(or pip install torchao), or set optim.name=adamw")
SETTINGS = tuple(f.name for f in fields(PhaseOptim))


class OptimConfig:
    """Shared settings plus per-phase overrides (``optim.<phase>.<setting>``).

    Args:
        lr, betas, eps, weight_decay, warmup_steps, max_grad_norm, name: the shared ``PhaseOptim``.
        **phases: ``phase name -> {setting: value | None}``; None values keep the shared setting.
    """

    def __init__(self, lr: float = 1e-4, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, warmup_steps: int = 0,
                 max_grad_norm: float | None = 10.0, name: str = "adamw",
                 **phases: Mapping[str, Any] | None) -> None:
        self.shared = PhaseOptim(float(lr), tuple(betas), float(eps), float(weight_decay),
                                 int(warmup_steps), _norm(max_grad_norm), str(name))
        self.overrides: dict[str, dict[str, Any]] = {}
        for phase, node in phases.items():
            values = _plain(node) or {}
            if not isinstance(values, dict):
                raise StepdistillError(f"optim.{phase} must be a mapping of per-phase overrides "
                                       f"({', '.join(SETTINGS)}) or a shared setting; got {values!r}")
            unknown = [k for k in values if k not in SETTINGS]
            if unknown:
                raise StepdistillError(f"unknown key 'optim.{phase}.{unknown[0]}'; allowed: {', '.join(SETTINGS)}")
            self.overrides[phase] = {k: v for k, v in values.items() if v is not None}
            self.for_phase(phase)  # a bad per-phase value is reported when the config is read

    def for_phases(self, phases: Iterable[str]) -> dict[str, PhaseOptim]:
        """The settings of every phase; an override for a phase the algorithm lacks is an error."""
        phases = list(phases)
        stray = [n for n, v in self.overrides.items() if v and n not in phases]
        if stray:
            raise StepdistillError(f"optim.{stray[0]} overrides a phase this algorithm does not have; "
                                   f"phases: {', '.join(phases)}; shared settings: {', '.join(SETTINGS)}")
        return {p: self.for_phase(p) for p in phases}

    def for_phase(self, phase: str) -> PhaseOptim:
        values = dict(self.overrides.get(phase, {}))
        try:
            for key in ("lr", "eps", "weight_decay", "max_grad_norm"):
                if key in values:
                    values[key] = float(values[key])
            if "warmup_steps" in values:
                values["warmup_steps"] = int(values["warmup_steps"])
        except (TypeError, ValueError) as e:
            raise StepdistillError(f"optim.{phase}: {e}") from None
        if values.get("name", OPTIMIZERS[0]) not in OPTIMIZERS:
            raise StepdistillError(f"optim.{phase}.name={values['name']!r} is not an optimizer; "
                                   f"allowed: {', '.join(OPTIMIZERS)}")
        if "max_grad_norm" in values:
            values["max_grad_norm"] = _norm(values["max_grad_norm"])
        return replace(self.shared, **values)


def build_optimizer(params: Sequence[torch.nn.Parameter], settings: PhaseOptim) -> torch.optim.Optimizer:
    """``settings.name`` over ``params``: ``torch.optim.AdamW``, or torchao's ``AdamW8bit`` (its
    learning rate is a 0-dim tensor, which the LR schedule updates in place)."""
    cls = adamw8bit_class() if settings.name == "adamw8bit" else torch.optim.AdamW
    return cls(params, lr=settings.lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)


def adamw8bit_class() -> type[torch.optim.Optimizer]:
    """torchao's ``AdamW8bit``, or a one-line error naming the install command. (The warnings torchao's
    import logs for CUDA kernel libraries that do not load are silenced by ``stepdistill/__init__.py``.)"""
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise StepdistillError(MISSING_8BIT) from None
    return AdamW8bit


def build_schedule(optimizer: torch.optim.Optimizer, settings: PhaseOptim) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``settings.warmup_steps`` updates, then constant."""
    warmup = settings.warmup_steps

    def factor(update: int) -> float:
        return min(1.0, (update + 1) / warmup) if warmup > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _norm(value: float | None) -> float | None:
    return None if value is None or float(value) <= 0 else float(value)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
