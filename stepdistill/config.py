"""Hydra-style config composition for the CLI: ``configs/<name>.yaml`` + group choices + overrides.

Errors (unknown group option, misspelt key, wrong type) become a one-line ``StepdistillError``
that names the key and, where Hydra knows them, the allowed values.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.utils import get_object
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from stepdistill.errors import StepdistillError
from stepdistill.tiny_stacks import tiny_stack_dir

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
    return str(tiny_stack_dir(kind))


#: keys that were renamed, per config (``configs/<name>.yaml``): old key -> new key. An override that
#: names an old key is a one-line error naming the new one (``check_renamed``).
RENAMED_KEYS: dict[str, dict[str, str]] = {
    "teacher": {"guidance_scale": "teacher.guidance_scale"},
}

#: command-line group names kept after a rename of the group, per config: alias -> group. The teacher
#: recipes (``configs/teacher_recipe/``) are still chosen with the documented ``dataset=toy2d|digits``.
GROUP_ALIASES: dict[str, dict[str, str]] = {
    "teacher": {"dataset": "teacher_recipe"},
}


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def check_renamed(name: str, overrides: Sequence[str]) -> None:
    """A one-line error for an override of a key that ``RENAMED_KEYS`` says was renamed."""
    renamed = RENAMED_KEYS.get(name, {})
    for override in overrides:
        key = _override_key(override)
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                value = override.split("=", 1)[1] if "=" in override else "..."
                raise StepdistillError(f"{old} was renamed {new}: write {new + key[len(old):]}={value}")


def _alias_groups(name: str, overrides: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``overrides`` with aliased group names (``dataset=``) replaced by the groups' own names, and
    the {group: alias} used (to name the alias back in errors)."""
    aliases = GROUP_ALIASES.get(name, {})
    out, used = [], {}
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" in override and key in aliases:
            used[aliases[key]] = key
            override = f"{aliases[key]}={override.split('=', 1)[1]}"
        out.append(override)
    return out, used


#: top-level nodes that are also config groups (configs/<group>/): ``critic=null`` drops the group
NULLABLE_GROUPS = ("algorithm", "generator", "critic")


def _null_group(override: str) -> str:
    """``critic=null`` (a node that is also a group) as ``~critic``: Hydra takes ``group=null`` for a
    group choice, which it refuses; deleting the choice leaves ``train.yaml``'s null."""
    key, _, value = override.partition("=")
    return f"~{key}" if key in NULLABLE_GROUPS and value.strip() in ("null", "None", "~") else override


def compose(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``configs/<name>.yaml`` with Hydra overrides; user errors as StepdistillError."""
    check_renamed(name, overrides)
    overrides, aliased = _alias_groups(name, overrides)
    overrides = [_null_group(o) for o in overrides]
    _register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(configs_dir()), version_base="1.3"):
            cfg = hydra_compose(name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        message = _one_line(e)
        for group, alias in aliased.items():
            message = message.replace(f"unknown {group} ", f"unknown {alias} ")
        raise StepdistillError(message) from None
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
        cfg = compose("train", _default_key_overrides(overrides))
    except StepdistillError:
        _check_critic_overrides(overrides)
        raise
    if cfg.algorithm is None:
        raise StepdistillError(f"choose an experiment: experiment=<dataset>/<name>; allowed: "
                               f"{', '.join(allowed) or '(none)'}")
    if cfg.experiment_name is None and chosen:
        cfg.experiment_name = chosen[-1]
    complete_roles(cfg)
    return cfg


def _default_key_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with ``<role>.<key>=v`` written ``+<role>.<key>=v`` where ``key`` is a signature
    default the YAML does not state (``algorithm.divergence=forward_kl`` on an experiment that keeps
    f-distill's default): Hydra refuses to override a key it has not seen. Other keys stay as given,
    so a misspelt one is still refused."""
    plain = [o for o in overrides if "=" in o and not o.startswith(("+", "~"))
             and o.split("=", 1)[0].split(".", 1)[0] in ROLE_NODES and "." in o.split("=", 1)[0]]
    if not plain:
        return list(overrides)
    base = compose("train", [o for o in overrides if o not in plain])
    filled = complete_roles(copy.deepcopy(base))
    out = []
    for o in overrides:
        if o in plain:
            role, key = o.split("=", 1)[0].split(".", 2)[:2]
            node, full = base.get(role), filled.get(role)
            if isinstance(node, DictConfig) and key not in node and isinstance(full, DictConfig) and key in full:
                o = "+" + o
        out.append(o)
    return out


#: the composed nodes whose YAML holds only what differs from their target's signature
ROLE_NODES = ("generator", "critic", "algorithm", "trajectories")
#: parameters that the commands pass at build time, never written in a config
BUILD_ARGUMENTS = frozenset({"denoiser", "teacher", "generator", "critic", "data", "copy"})


def complete_roles(cfg: DictConfig) -> DictConfig:
    """Fill the generator, critic, algorithm (and AGD's trajectories) nodes with their targets'
    signature defaults.

    The group and experiment files state only values that differ from a signature
    (``configs/algorithm/``, ``generator/``, ``critic/``); the composed config, and so a run's
    ``config.yaml`` and everything that reads it, still names every effective value.
    """
    for key in ROLE_NODES:
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            params = inspect.signature(get_object(str(node._target_))).parameters
        except Exception:  # noqa: BLE001 - an unimportable target: instantiate names it later
            continue
        with open_dict(node):
            for pname, p in params.items():
                if pname in BUILD_ARGUMENTS or pname in node or p.default is p.empty or not _plain(p.default):
                    continue
                node[pname] = list(p.default) if isinstance(p.default, tuple) else p.default
    return cfg


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


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
