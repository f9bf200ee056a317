"""LoRA roles through peft: adapters on the teacher's own network, so one copy of the base weights.

``add_lora`` injects a named LoRA adapter (``peft.inject_adapter_in_model``, B = 0 so the role starts
as the teacher) into a backbone that the teacher keeps using: the generator's ``student`` adapter
(LCM-LoRA, Luo et al. 2023b) and the critic's ``critic`` adapter (a LoRA fake score) can live in one
backbone together. Every role computes inside ``active_adapter``: the teacher with none (the base),
the generator with only ``student``, the critic with only ``critic``; the selection changes no
``requires_grad`` flag (the trainer owns those) and is restored on exit, exceptions included.
``merged_backbone`` gives a plain diffusers model with the student's LoRA folded in (the run's
``student/``; other adapters are dropped), ``diffusers_lora_state_dict`` the student's adapter
weights in the layout ``load_lora_weights`` reads, and ``LoraEMA`` an exponential moving average of
the adapter weights alone (an EMA target network that costs two LoRA copies, not a second base).
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stepdistill.dtensors import shaped_like, whole

#: the generator's adapter (the exported student's LoRA)
ADAPTER = "student"
#: the critic's adapter (a LoRA fake score on the teacher's base)
CRITIC_ADAPTER = "critic"


def _tuner_layers(backbone: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    if "peft" not in sys.modules:  # no LoRA layer can exist (and none is looked for with an import)
        return iter(())
    from peft.tuners.tuners_utils import BaseTunerLayer

    return ((name, m) for name, m in backbone.named_modules() if isinstance(m, BaseTunerLayer))


#: module -> its LoRA layers, looked up once (``add_lora`` clears it): ``active_adapter`` runs
#: at every role's forward, and walking a large UNet's modules costs milliseconds
_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, ...]] = weakref.WeakKeyDictionary()


def _lora_layers(backbone: nn.Module) -> tuple[nn.Module, ...]:
    layers = _LAYERS.get(backbone)
    if layers is None:
        layers = _LAYERS[backbone] = tuple(m for _, m in _tuner_layers(backbone))
    return layers


def has_lora(backbone: nn.Module, adapter: str | None = ADAPTER) -> bool:
    """Whether ``backbone`` holds LoRA adapter ``adapter`` (None: any adapter)."""
    return any(adapter is None or adapter in _adapters_of(m) for _, m in _tuner_layers(backbone))


def _adapters_of(layer: nn.Module) -> set[str]:
    return set(getattr(layer, "scaling", {}))


def add_lora(backbone: nn.Module, rank: int, alpha: float | None = None,
             target_modules: list[str] | str | None = None, *, adapter: str = ADAPTER,
             key: str = "generator") -> None:
    """Inject LoRA adapter ``adapter`` (rank ``rank``, scale ``alpha / rank``; alpha defaults to rank)
    into the modules of ``backbone`` named by ``target_modules`` (peft's matching: suffixes or a
    regex). The new adapter's weights require grad; every other parameter's ``requires_grad`` and
    every LoRA layer's adapter selection stay as they were (outside ``active_adapter`` a backbone
    runs its ``student`` adapter where it has one). ``key`` names the config node in errors."""
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"{key}.lora_rank must be >= 1, got {rank}")
    if not target_modules:
        raise ValueError(f"{key}.lora_target_modules is required with {key}.lora_rank "
                         "(e.g. [to_q, to_k, to_v, to_out.0] for a UNet2DConditionModel)")
    if has_lora(backbone, adapter):
        raise ValueError(f"the backbone already holds a LoRA adapter named {adapter!r}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank),
                        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
                        init_lora_weights=True)
    grad = {id(p): p.requires_grad for p in backbone.parameters()}
    try:
        with warnings.catch_warnings():  # a second adapter in one model is the point here
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            inject_adapter_in_model(config, backbone, adapter_name=adapter)
    except ValueError as e:
        raise ValueError(f"{key}.lora_target_modules {target_modules} match no module of "
                         f"{type(backbone).__name__}: {str(e).splitlines()[0]}") from None
    for p in backbone.parameters():  # peft's injection toggles flags: keep the others' as they were
        p.requires_grad_(grad.get(id(p), True))
    _LAYERS.clear()  # new LoRA layers: look every backbone (and block) up again
    layers = _lora_layers(backbone)
    _restore(layers, [([ADAPTER], False)] * len(layers))


def lora_named_parameters(backbone: nn.Module, adapter: str | None = ADAPTER) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of LoRA adapter ``adapter`` in ``backbone`` (None: of every adapter)."""
    return [(n, p) for n, p in backbone.named_parameters() if adapter_of(n) is not None
            and (adapter is None or adapter_of(n) == adapter)]


_ADAPTER_NAME = re.compile(r"(?:^|\.)lora_\w+\.([^.]+)(?:\.|$)")


def adapter_of(name: str) -> str | None:
    """The LoRA adapter a parameter name belongs to (``proj_in.lora_A.critic.weight`` -> ``critic``),
    or None for a base weight."""
    found = _ADAPTER_NAME.search(name)
    return found.group(1) if found else None


Selection = tuple[object, bool]  # a LoRA layer's (active adapters, adapters disabled)


def _selection(layers: tuple[nn.Module, ...]) -> list[Selection]:
    return [(m._active_adapter, m._disable_adapters) for m in layers]


def _restore(layers: tuple[nn.Module, ...], selection: list[Selection]) -> None:
    for m, (active, disabled) in zip(layers, selection, strict=True):
        # plain attributes, set without nn.Module.__setattr__'s checks (this runs at every forward)
        m.__dict__.update(_active_adapter=active, _disable_adapters=disabled)


@contextlib.contextmanager
def active_adapter(backbone: nn.Module, adapter: str | None) -> Iterator[None]:
    """Within the block ``backbone`` runs with LoRA adapter ``adapter`` alone (a layer without it runs
    its base layer), or with None as its base model (every LoRA layer bypassed). Only the selection
    changes (no ``requires_grad`` flag: peft's ``set_adapter`` / ``enable_adapters`` would flip
    them); the previous selection is restored on exit, also after an exception. Blocks nest."""
    layers = _lora_layers(backbone)
    saved = _selection(layers)
    off = adapter is None
    _restore(layers, [(active, True) for active, _ in saved] if off else [([adapter], False)] * len(saved))
    try:
        yield
    finally:
        _restore(layers, saved)


def adapters_disabled(backbone: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block ``backbone`` runs as its base model (``active_adapter(backbone, None)``)."""
    return active_adapter(backbone, None)


def checkpoint_contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager[None],
                                                    contextlib.AbstractContextManager[None]]:
    """``torch.utils.checkpoint``'s ``context_fn`` for a block of a backbone with adapters: called at
    the forward, it returns (nothing for the forward, the forward's adapter selection re-applied for
    the recomputation in backward). Without it a checkpointed role recomputes with whatever adapter
    is selected when backward runs (none of the roles' blocks is open then): wrong gradients."""
    layers = _lora_layers(module)
    forward = _selection(layers)

    @contextlib.contextmanager
    def recompute() -> Iterator[None]:
        saved = _selection(layers)
        _restore(layers, forward)
        try:
            yield
        finally:
            _restore(layers, saved)

    return contextlib.nullcontext(), recompute()


def gradient_checkpointing_func(module: nn.Module, *args: object) -> object:
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing``: torch's
    non-reentrant checkpoint of ``module(*args)`` that recomputes with the forward's adapters."""
    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=lambda: checkpoint_contexts(module))


def merged_backbone(backbone: nn.Module, adapter: str = ADAPTER) -> nn.Module:
    """A plain copy of ``backbone`` (its own class, from its config) with adapter ``adapter``'s
    W + scale B A folded in (default: the student's); any other adapter (a LoRA critic's) is left out."""
    plain = type(backbone).from_config(backbone.config)
    state = {n.replace(".base_layer.", "."): v for n, v in backbone.state_dict().items() if ".lora_" not in n}
    with torch.no_grad():
        for name, layer in _tuner_layers(backbone):
            if adapter not in _adapters_of(layer):  # another role's adapter only (a LoRA critic's)
                continue
            weight = layer.get_base_layer().weight
            state[f"{name}.weight"] = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    plain.load_state_dict(state)
    dtype = next(backbone.parameters()).dtype
    return plain if next(plain.parameters()).dtype == dtype else plain.to(dtype)


def diffusers_lora_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The adapter weights in the layout diffusers' ``save_lora_weights(unet_lora_layers=...)`` writes
    and ``load_lora_weights`` reads (peft names, ``unet.`` prefix), with the scale alpha / rank folded
    into B so that a loader's default alpha (= rank) gives the same W + (alpha / rank) B A."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(backbone, adapter_name=ADAPTER)
    scaling = {name: float(layer.scaling[ADAPTER]) for name, layer in _tuner_layers(backbone)
               if ADAPTER in _adapters_of(layer)}
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
        for ema, p in self._pairs(backbone):  # sharded (FSDP) adapters: the EMA keeps them whole
            ema.lerp_(whole(p.detach()).to(ema.dtype), 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, backbone: nn.Module) -> Iterator[None]:
        """Within the block the backbone's adapters hold the EMA weights (restored afterwards)."""
        pairs = self._pairs(backbone)
        with torch.no_grad():
            saved = [p.detach().clone() for _, p in pairs]
            for ema, p in pairs:
                p.copy_(shaped_like(ema, p))
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), old in zip(pairs, saved, strict=True):
                    p.copy_(old)

