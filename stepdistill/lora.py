"""LoRA students through peft: adapters on the teacher's own network, so one copy of the base weights.

``add_lora`` injects LoRA layers (``peft.inject_adapter_in_model``, B = 0 so the student starts as the
teacher) into a backbone that the teacher keeps using: ``Teacher.predict`` runs inside
``adapters_disabled`` (LCM-LoRA, Luo et al. 2023b: the teacher is the base without adapters).
``merged_backbone`` gives a plain diffusers model with the LoRA folded in (the run's ``student/``),
``diffusers_lora_state_dict`` the adapter weights in the layout ``load_lora_weights`` reads, and
``LoraEMA`` an exponential moving average of the adapter weights alone (an EMA target network that
costs two LoRA copies, not a second base).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

ADAPTER = "student"


def _tuner_layers(backbone: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return ((name, m) for name, m in backbone.named_modules() if isinstance(m, BaseTunerLayer))


def has_lora(backbone: nn.Module) -> bool:
    return next(_tuner_layers(backbone), None) is not None


def add_lora(backbone: nn.Module, rank: int, alpha: float | None = None,
             target_modules: list[str] | str | None = None) -> None:
    """Inject LoRA adapters (rank ``rank``, scale ``alpha / rank``; alpha defaults to rank) into the
    modules of ``backbone`` named by ``target_modules`` (peft's matching: suffixes or a regex)."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"generator.lora_rank must be >= 1, got {rank}")
    if not target_modules:
        raise ValueError("generator.lora_target_modules is required with generator.lora_rank "
                         "(e.g. [to_q, to_k, to_v, to_out.0] for a UNet2DConditionModel)")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
                        init_lora_weights=True)
    try:
        inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    except ValueError as e:
        raise ValueError(f"generator.lora_target_modules {target_modules} match no module of "
                         f"{type(backbone).__name__}: {str(e).splitlines()[0]}") from None


def lora_named_parameters(backbone: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in backbone.named_parameters() if ".lora_" in n]


@contextlib.contextmanager
def adapters_disabled(backbone: nn.Module) -> Iterator[None]:
    """Within the block ``backbone`` runs as its base model (every LoRA layer bypassed)."""
    layers = [m for _, m in _tuner_layers(backbone)]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


def merged_backbone(backbone: nn.Module) -> nn.Module:
    """A plain copy of ``backbone`` (its own class, from its config) with W + scale B A folded in."""
    plain = type(backbone).from_config(backbone.config)
    state = {n.replace(".base_layer.", "."): v for n, v in backbone.state_dict().items() if ".lora_" not in n}
    with torch.no_grad():
        for name, layer in _tuner_layers(backbone):
            weight = layer.get_base_layer().weight
            state[f"{name}.weight"] = weight + layer.get_delta_weight(ADAPTER).to(weight.dtype)
    plain.load_state_dict(state)
    dtype = next(backbone.parameters()).dtype
    return plain if next(plain.parameters()).dtype == dtype else plain.to(dtype)


def diffusers_lora_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The adapter weights in the layout diffusers' ``save_lora_weights(unet_lora_layers=...)`` writes
    and ``load_lora_weights`` reads (peft names, ``unet.`` prefix), with the scale alpha / rank folded
    into B so that a loader's default alpha (= rank) gives the same W + (alpha / rank) B A."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(backbone, adapter_name=ADAPTER)
    scaling = {name: float(layer.scaling[ADAPTER]) for name, layer in _tuner_layers(backbone)}
    out = {}
    for key, value in state.items():  # fold alpha / rank into B: loaders that assume alpha = rank agree
        layer = key.rsplit(".lora_", 1)[0]
        factor = scaling[layer] if ".lora_B." in key else 1.0
        out[f"unet.{key}"] = (value.detach() * factor).contiguous()
    return out


class LoraEMA(nn.Module):
    """EMA of a backbone's LoRA weights, kept as buffers (checkpointed with the run), swapped into
    the backbone for the target network's forwards."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.names = [n for n, _ in lora_named_parameters(backbone)]
        for n, p in lora_named_parameters(backbone):
            self.register_buffer(n.replace(".", "__"), p.detach().clone())

    def _pairs(self, backbone: nn.Module) -> list[tuple[Tensor, nn.Parameter]]:
        params = dict(lora_named_parameters(backbone))
        return [(getattr(self, n.replace(".", "__")), params[n]) for n in self.names]

    @torch.no_grad()
    def update(self, backbone: nn.Module, decay: float) -> None:
        for ema, p in self._pairs(backbone):
            ema.lerp_(p.detach().to(ema.dtype), 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, backbone: nn.Module) -> Iterator[None]:
        """Within the block the backbone's adapters hold the EMA weights (restored afterwards)."""
        pairs = self._pairs(backbone)
        with torch.no_grad():
            saved = [p.detach().clone() for _, p in pairs]
            for ema, p in pairs:
                p.copy_(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), old in zip(pairs, saved, strict=True):
                    p.copy_(old)
