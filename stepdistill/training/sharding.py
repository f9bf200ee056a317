"""FSDP2 for the trained roles (``trainer.strategy=fsdp|hsdp``): torch's ``fully_shard``, used directly.

- Each trained role (generator, critic, discriminator heads) is sharded per block: every submodule
  whose class a backbone lists in ``_no_split_modules`` (diffusers' own list: e.g. SDXL's
  ``BasicTransformerBlock``, ``ResnetBlock2D``, ...), bottom-up, then each backbone, then each child
  of the role that still holds unsharded parameters (its heads). Each backbone is an FSDP root of its
  own, so any call path into it (the role's forward, a teacher sharing a LoRA student's base) gathers
  what it needs; no process ever runs an inner module on shards. Blocks free their gathered weights
  after their forward; a backbone's own (embeddings, in / out layers) and a head's stay gathered until
  the backward (``shard``).
- ``fsdp`` shards over every process (a 1-D mesh); ``hsdp`` over the processes of a node and
  replicates across nodes (a 2-D mesh: ``(replicate, shard)``, shard = ``LOCAL_WORLD_SIZE``).
- The teacher is sharded the same way (``teacher_placement=shard``) or left whole on every process.
- Parameters are DTensors afterwards: optimizers are built on them, the gradient norm of
  ``clip_grad_norm_`` over them is global (the same number on every rank), and
  ``torch.distributed.checkpoint`` saves them shard by shard (``save_sharded`` / ``load_sharded``).
- Whole modules exist only where asked for: ``gathered`` assembles a full, unsharded copy of a
  role from a skeleton taken before sharding (on the ``meta`` device: no memory) and the full
  state dict gathered from all ranks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from stepdistill.dtensors import whole
from stepdistill.errors import StepdistillError

MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_shardable(generator: nn.Module, strategy: str) -> None:
    """A one-line error where sharding cannot work: AGD's guidance adapters run inside the base's blocks
    through hooks, outside any FSDP unit's forward (and are 1-2% of the base: DDP carries them)."""
    if strategy != "ddp" and getattr(generator, "adapters", None) is not None:
        raise StepdistillError(f"trainer.strategy={strategy} cannot shard AGD's guidance adapters (hooks inside "
                               "the base's blocks); they are 1-2% of the base: use trainer.strategy=ddp")


def device_mesh(strategy: str, device: torch.device):
    """The mesh of ``strategy`` over every process: 1-D for fsdp, ``(replicate, shard)`` for hsdp."""
    if not dist.is_initialized():  # one process, not launched: a group of one (FSDP on one GPU)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    world = dist.get_world_size()
    kind = device.type
    if strategy == "fsdp":
        return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))
    shard = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % shard:
        raise StepdistillError(f"trainer.strategy=hsdp: {world} processes are not a multiple of the "
                               f"{shard} per node (LOCAL_WORLD_SIZE); launch the same number on every node")
    return init_device_mesh(kind, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def free_port() -> int:
    """A free TCP port on this machine (a one-process group's rendezvous; the tests' launchers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mixed_precision_policy(mixed_precision: str):
    """FSDP2's policy: parameters gathered in bf16 / fp16, gradients reduced in fp32 (or none)."""
    dtype = MIXED.get(mixed_precision)
    return None if dtype is None else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def block_classes(module: nn.Module) -> set[str]:
    """Class names of the blocks to shard one by one: every ``_no_split_modules`` inside ``module``."""
    return {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or [])}


def shard(role: nn.Module, mesh, policy=None, done: set[int] | None = None, trained: bool = True) -> int:
    """``fully_shard`` a role per block (see the module docstring); modules in ``done`` (shared
    with a role sharded before, e.g. a LoRA student's base) are skipped. Returns the number of units.

    The role itself is not a unit: each backbone is its own FSDP root, so a teacher that runs a LoRA
    student's shared base directly and the student's own forward gather the same units alike. The
    role's other parameters (a discriminator head) go to a unit per child that holds them. An untrained
    network (``trained=False``: a sharded teacher, an EMA target) frees every unit after its forward.
    """
    done = set() if done is None else done
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy is not None else {})
    blocks = block_classes(role)
    count = 0
    for m in reversed(list(role.modules())):  # post-order: inner blocks before the ones holding them
        if id(m) not in done and (type(m).__name__ in blocks or hasattr(m, "_no_split_modules")):
            # a block frees its gathered weights after its forward; a backbone keeps its own (embeddings,
            # in / out layers) until its backward: an output such as the GAN head's features leaves the
            # backbone before its last layer, and a backward from there never passes the backbone's output
            fully_shard(m, reshard_after_forward=not trained or type(m).__name__ in blocks, **kwargs)
            done.add(id(m))
            count += 1
    for child in role.children():
        if id(child) not in done and any(not isinstance(p, DTensor) for p in child.parameters()):
            fully_shard(child, reshard_after_forward=not trained, **kwargs)
            done.add(id(child))
            count += 1
    return count


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """FSDP2's no_sync for a role: gradients accumulate unreduced in every unit until the block exits."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in units:
            m.set_requires_gradient_sync(True, recurse=False)


def reshard(module: nn.Module) -> None:
    """Free every gathered parameter of a sharded module (between phases: the next gather then takes
    each parameter's current ``requires_grad``)."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def check_sharded(role: nn.Module, name: str) -> None:
    """Every trainable parameter of ``role`` is a DTensor (else its gradients would never be reduced)."""
    plain = [n for n, p in role.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if plain:
        raise StepdistillError(f"trainer.strategy=fsdp left {len(plain)} trained parameter(s) of the {name} "
                               f"unsharded (first: {plain[0]}); use trainer.strategy=ddp for this model")


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device (no memory):
    the structure ``gathered`` fills with full weights after sharding."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def to_device(module: nn.Module, device: torch.device) -> None:
    """``module.to(device)`` for what is not sharded (DTensor parameters stay where FSDP put them)."""
    module._apply(lambda t: t if isinstance(t, DTensor) else t.to(device))


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict of a sharded module, on the CPU of rank 0 (empty elsewhere).
    Every process must call it."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered(module: nn.Module, skeleton_module: nn.Module, overrides: dict[str, Tensor] | None = None,
             device: torch.device | str = "cpu") -> nn.Module | None:
    """A whole copy of the sharded ``module`` on rank 0 (None elsewhere): the skeleton filled with the
    gathered state dict, then ``overrides`` (full tensors by name: the EMA's), plus the live module's
    non-persistent buffers. Every process must call it."""
    reshard(module)
    state = full_state_dict(module)
    if dist.get_rank() != 0:
        return None
    state.update(overrides or {})
    whole = copy.deepcopy(skeleton_module).to_empty(device=device)
    whole.load_state_dict(state, strict=True)
    live = dict(module.named_buffers())
    persistent = set(state)
    with torch.no_grad():
        for name, b in whole.named_buffers():
            if name not in persistent:
                b.copy_(whole(live[name]))
    return whole


class ShardedEMA:
    """The EMA of a sharded generator: one shadow shard per trained parameter (frozen parameters, e.g.
    a LoRA student's base, equal the live ones), updated locally; gathered only to save, sample or
    export (``full``). ``ema = decay * ema + (1 - decay) * param`` (as ``EMA``).

    Args:
        model: the sharded generator.
        decay: the EMA decay.
        trained: the ids of the parameters the generator's phases train.
    """

    def __init__(self, model: nn.Module, decay: float, trained: set[int]) -> None:
        self.decay = float(decay)
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in trained}
        self.model: nn.Module | None = None  # the gathered EMA generator, set when a run ends (rank 0)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        reshard(model)
        live = dict(model.named_parameters())
        for name, s in self.shadow.items():
            s.lerp_(live[name].detach().to(s.dtype), 1.0 - self.decay)

    def full(self) -> dict[str, Tensor]:
        """Every shadow as a full CPU tensor on rank 0 (empty elsewhere); all processes must call it."""
        out = {}
        for name, s in self.shadow.items():
            value = whole(s)
            if dist.get_rank() == 0:
                out[name] = value.cpu()
        return out

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """Within the block the sharded ``model``'s trained parameters hold the EMA shards (restored
        after): sampling the EMA generator gathers nothing whole beyond what a forward gathers."""
        reshard(model)  # a no-grad forward may have left a root gathered (plain tensors in place)
        live = dict(model.named_parameters())
        with torch.no_grad():
            saved = {n: live[n].detach().clone() for n in self.shadow}
            for name, s in self.shadow.items():
                live[name].copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    live[name].copy_(value)

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, s in self.shadow.items():
                s.copy_(state[name])


def save_sharded(directory: Path, modules: dict[str, nn.Module], optimizers: dict[str, Any],
                 phase_modules: dict[str, nn.Module], ema: ShardedEMA | None) -> None:
    """Every rank writes its shards of the trained roles, their optimizers and the EMA with torch
    distributed checkpoint (``directory``: a DCP checkpoint)."""
    dcp.save(_sharded_state(modules, optimizers, phase_modules, ema), checkpoint_id=str(directory))


def load_sharded(directory: Path, modules: dict[str, nn.Module], optimizers: dict[str, Any],
                 phase_modules: dict[str, nn.Module], ema: ShardedEMA | None) -> None:
    """Restore what ``save_sharded`` wrote, in place (the same strategy and process count). An optimizer
    saved before its phase's first step stays as it is (empty): initialising it to load nothing would
    step its counter."""
    saved = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    optimizers = {ph: opt for ph, opt in optimizers.items() if any(k.startswith(f"optim.{ph}.state.") for k in saved)}
    state = _sharded_state(modules, optimizers, phase_modules, ema)
    dcp.load(state, checkpoint_id=str(directory))
    for name, module in modules.items():
        set_model_state_dict(module, state[f"model.{name}"])
    for phase, opt in optimizers.items():
        set_optimizer_state_dict(phase_modules[phase], opt, state[f"optim.{phase}"])
    if ema is not None:
        ema.load_state_dict(state["ema"])


def _sharded_state(modules, optimizers, phase_modules, ema) -> dict[str, Any]:
    state: dict[str, Any] = {f"model.{n}": get_model_state_dict(m) for n, m in modules.items()}
    state |= {f"optim.{ph}": get_optimizer_state_dict(phase_modules[ph], opt) for ph, opt in optimizers.items()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state
