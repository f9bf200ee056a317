"""Memory switches of the trainer, applied to an algorithm's roles once at setup (issue 21, section 2).

- ``trainer.gradient_checkpointing=true``: the generator's and the critic's backbones recompute their
  blocks' activations in backward instead of keeping them (diffusers' ``enable_gradient_checkpointing``,
  non-reentrant ``torch.utils.checkpoint``; ``ToyMLP`` supports it the same way). diffusers checkpoints
  only where ``torch.is_grad_enabled()`` (not by train / eval mode), so the teacher (``torch.no_grad``)
  and sampling never recompute, also when LoRA roles share the teacher's backbone. The recomputation
  runs with the LoRA adapters its forward ran with (``lora.gradient_checkpointing_func``: when backward
  runs, no role's adapter selection is open). Gradients are unchanged. AGD's guidance adapters
  (forward hooks that act only inside the forward) cannot be recomputed: refused.
- ``trainer.attention=sdpa|xformers``: every diffusers attention layer of every role (teacher,
  generator, critic, target networks) runs that backend, in training and in sampling
  (``stepdistill.kernels.set_model_attention``; xformers only where it imports, on CUDA).
- ``trainer.teacher_placement=offload``: the teacher's weights stay in CPU memory and each block moves
  to the device for its own forward (diffusers' block-level group offloading, one block per group).
  A teacher whose network a trained role shares (a LoRA generator or critic, AGD's adapters) cannot be
  offloaded: the trained role needs those weights on the device for its backward.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import HookRegistry, apply_group_offloading
from torch import nn

from stepdistill.algorithms.base import Algorithm, unwrap
from stepdistill.errors import StepdistillError
from stepdistill.kernels.attention import set_model_attention
from stepdistill.lora import gradient_checkpointing_func
from stepdistill.roles import AdapterGenerator
from stepdistill.training.settings import TrainerConfig

#: the roles whose backbones train (and are checkpointed), in the order they are reported
TRAINED_ROLES = ("generator", "critic")
#: the group-offloading hook diffusers registers on each offloaded block
OFFLOAD_HOOK = "group_offloading"


def apply_memory_switches(algorithm: Algorithm, config: TrainerConfig,
                          device: torch.device | str) -> dict[str, Any]:
    """Apply ``trainer.attention``, ``trainer.gradient_checkpointing`` and ``trainer.teacher_placement``
    to ``algorithm``'s roles, which are already on ``device``.

    Returns:
        what was done: ``{"attention_layers": n, "checkpointed": [role, ...], "offloaded_blocks": n}``.
    Raises:
        StepdistillError: a switch that cannot apply (xformers without CUDA, checkpointing a backbone or
        generator that does not support it, offloading a teacher a trained role shares).
    """
    layers = set_model_attention(algorithm, config.attention, device)
    checkpointed = enable_checkpointing(algorithm) if config.gradient_checkpointing else []
    offloaded = offload_teacher(algorithm, device) if config.teacher_placement == "offload" else 0
    return {"attention_layers": len(layers), "checkpointed": checkpointed, "offloaded_blocks": offloaded}


def trained_backbones(algorithm: Algorithm) -> dict[str, nn.Module]:
    """Role name -> the backbone of the generator and, when the algorithm has one, the critic
    (discriminator heads are not backbones: they stay as they are)."""
    out = {}
    for role in TRAINED_ROLES:
        module = getattr(algorithm, role, None)
        if module is not None:
            out[role] = unwrap(module).denoiser.backbone
    return out


# --------------------------------------------------------------------------- gradient checkpointing
def enable_checkpointing(algorithm: Algorithm) -> list[str]:
    """Turn on gradient checkpointing in the generator's and the critic's backbones; returns the roles."""
    if isinstance(unwrap(algorithm.generator), AdapterGenerator):
        raise StepdistillError("trainer.gradient_checkpointing cannot recompute AGD's guidance adapters (they act "
                               "only inside the forward): set trainer.gradient_checkpointing=false")
    backbones = trained_backbones(algorithm)
    for role, backbone in backbones.items():
        if not getattr(backbone, "_supports_gradient_checkpointing", False):
            raise StepdistillError(f"trainer.gradient_checkpointing: the {role}'s {type(backbone).__name__} does "
                                   "not support gradient checkpointing; set trainer.gradient_checkpointing=false")
        backbone.enable_gradient_checkpointing(gradient_checkpointing_func)  # recomputes with the forward's LoRA
    return list(backbones)


# --------------------------------------------------------------------------- teacher offload
def offload_teacher(algorithm: Algorithm, device: torch.device | str) -> int:
    """Keep the teacher's backbone weights in CPU memory, each block moved to ``device`` for its forward
    (diffusers' ``apply_group_offloading``, block level, one block per group; on a CPU device the moves
    are no-ops but the hooks run). Returns the number of offloaded blocks (hooked modules)."""
    backbone = algorithm.teacher.denoiser.backbone
    check_not_shared(algorithm, backbone)
    apply_group_offloading(backbone, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1)
    return len(offloaded_modules(backbone))


def check_not_shared(algorithm: Algorithm, backbone: nn.Module) -> None:
    """A one-line error if any other role of ``algorithm`` holds a parameter of the teacher's ``backbone``."""
    teacher_params = {id(p) for p in backbone.parameters()}
    for name, child in algorithm.named_children():
        if name != "teacher" and any(id(p) in teacher_params for p in child.parameters()):
            raise StepdistillError(f"trainer.teacher_placement=offload: the {name} shares the teacher's network "
                                   "(LoRA or adapters on one base) and trains on the device; use "
                                   "trainer.teacher_placement=replicate")


def offloaded_modules(backbone: nn.Module) -> list[str]:
    """Names of ``backbone``'s modules that carry a diffusers group-offloading hook ("" is the top level,
    which moves the weights outside the blocks)."""
    return [name for name, m in backbone.named_modules()
            if hasattr(m, "_diffusers_hook") and HookRegistry.check_if_exists_or_initialize(m).get_hook(OFFLOAD_HOOK)]
