"""Hydra-style config composition for the CLI: ``configs/<name>.yaml`` + group choices + overrides.

Errors (unknown group option, misspelt key, wrong type) become a one-line ``StepdistillError``
that names the key and, where Hydra knows them, the allowed values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stepdistill.errors import StepdistillError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"


def configs_dir() -> Path:
    """The shipped ``configs/`` tree (next to the package in a checkout)."""
    for cand in (PACKAGE_DIR.parent / "configs", PACKAGE_DIR / "configs"):
        if cand.is_dir():
            return cand
    raise StepdistillError("the configs/ directory was not found next to the stepdistill package; "
                           "install stepdistill from a checkout (pip install -e .)")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS_DIR / rel))
    if not OmegaConf.has_resolver("tiny_stack"):
        OmegaConf.register_new_resolver("tiny_stack", _tiny_stack)


def _tiny_stack(kind: str) -> str:
    """``${tiny_stack:sd15}``: the path of a tiny SD stack built into the cache on first use."""
    from stepdistill.tiny_stacks import tiny_stack_dir

    return str(tiny_stack_dir(kind))


def compose(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with Hydra overrides; user errors as StepdistillError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(configs_dir()), version_base="1.3"):
            cfg = hydra_compose(name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise StepdistillError(_one_line(e)) from None
    return cfg


def experiments(overrides: Sequence[str] = ()) -> list[str]:
    """The experiments, as ``experiment=`` values (``<dataset>/<name>``): the shipped ones and those
    in directories added with ``hydra.searchpath=[file://DIR]``."""
    roots = [configs_dir()] + [Path(p) for o in overrides if o.startswith("hydra.searchpath=")
                               for p in re.findall(r"file://([^,\]'\"]+)", o)]
    found = {str(p.relative_to(r / "experiment").with_suffix("")) for r in roots
             for p in (r / "experiment").rglob("*.yaml")}
    return sorted(found)


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """Compose ``train.yaml`` with the chosen experiment; a missing or unknown one is a one-line error
    listing the allowed ones (Hydra names none for a group whose default is null)."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    allowed = experiments(overrides)
    if chosen and chosen[-1] not in allowed:
        raise StepdistillError(f"unknown experiment {chosen[-1]!r}; allowed: {', '.join(allowed) or '(none)'}")
    try:
        cfg = compose("train", overrides)
    except StepdistillError:
        _check_critic_overrides(overrides)
        raise
    if cfg.algorithm is None:
        raise StepdistillError(f"choose an experiment: experiment=<dataset>/<name>; allowed: "
                               f"{', '.join(allowed) or '(none)'}")
    if cfg.experiment_name is None and chosen:
        cfg.experiment_name = chosen[-1]
    return cfg


def _check_critic_overrides(overrides: Sequence[str]) -> None:
    """When ``critic.*`` overrides were refused because the experiment has no critic, say so."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides if o.lstrip("+~").startswith("critic.")]
    if not keys:
        return
    try:
        cfg = compose("train", [o for o in overrides if not o.lstrip("+~").startswith("critic.")])
    except StepdistillError:
        return
    if cfg.critic is None and cfg.algorithm is not None:
        raise StepdistillError(no_critic_message(cfg, [k.split(".", 1)[1] for k in keys]))


def no_critic_message(cfg: DictConfig, keys: Sequence[str]) -> str:
    """The error for ``critic.<key>`` settings given to an experiment whose algorithm trains no critic."""
    algorithm = str(cfg.algorithm.get("_target_", "?")).rsplit(".", 1)[-1]
    given = ", ".join(f"critic.{k}" for k in keys)
    return (f"{given} given, but {algorithm} trains no critic (critic is null in this experiment): "
            "critic settings such as critic.lora_rank are for DMD2, f-distill and SiD; drop them")


def _one_line(e: Exception) -> str:
    """A readable single line from Hydra / OmegaConf's multi-line messages."""
    text = str(e).strip()
    missing = re.search(r"Could not find '([^']+)'", text)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        block = text.split("Available options", 1)[-1].split("Config search path", 1)[0]
        options = re.findall(r"^\t(\S+)$", block, re.M) if "Available options" in text else []
        allowed = f"; allowed: {', '.join(options)}" if options else ""
        return f"unknown {group or 'config'} {option!r}{allowed}"
    not_struct = re.search(r"Could not override '([^']+)'", text)
    if not_struct:
        return (f"unknown config key {not_struct.group(1)!r} (misspelt? see the "
                f"files under configs/; a deliberate new key is written +{not_struct.group(1)}=...)")
    first = " ".join(line.strip() for line in text.splitlines()[:2] if line.strip())
    return first or type(e).__name__


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with one-line errors naming the node's target and the bad key.

    Runtime objects (teacher, data, ...) are passed as keyword arguments, as the design asks.
    """
    from hydra.utils import get_object
    from hydra.utils import instantiate as hydra_instantiate

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if target is not None:
        try:
            fn = get_object(target)
        except Exception:
            raise StepdistillError(f"unknown _target_ {target!r}: not importable") from None
        check_keys(target, fn, [k for k in node if not str(k).startswith("_")] + list(kwargs))
    try:
        return hydra_instantiate(node, **kwargs)
    except StepdistillError:
        raise
    except Exception as e:
        cause = e.__cause__ or e
        raise StepdistillError(f"cannot build {target}: {_one_line(cause)}") from None


def check_keys(target: str, fn: Any, keys: Sequence[str]) -> None:
    """Every key must be a parameter of ``fn`` (unless it takes ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n != "self" and p.kind != p.VAR_POSITIONAL]
    unknown = [k for k in keys if k not in params]
    if unknown:
        raise StepdistillError(f"unknown key {unknown[0]!r} for {target}; allowed: {', '.join(allowed)}")
