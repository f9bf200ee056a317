"""Which config a benchmark row measured: the effective config of an experiment and its hash.

A row written by ``stepdistill bench`` records ``config_sha``, the hash of its experiment's
*effective* config: the composed config (interpolations left unresolved, so no machine path enters
it) over the base ``train.yaml`` (a key added there later, with the value that keeps the earlier
behaviour, reads the same in an older config), in which every ``_target_`` node is completed with its
target's signature defaults. Restating a default in YAML, or dropping one, leaves the hash as it is;
changing what a run does changes it. The
generated tables compare each row's hash with the shipped config's and mark the rows measured on an
older one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

from hydra.utils import get_object
from omegaconf import OmegaConf

from stepdistill.config import compose, compose_train

#: keys that name, place or display a run without changing what it computes
IGNORED_KEYS = ("output_dir", "experiment_name", "overwrite", "logger", "trainer.progress")
SHA_LENGTH = 10


def base_config() -> dict[str, Any]:
    """``train.yaml`` with its default groups and no experiment."""
    return OmegaConf.to_container(compose("train", ["output_dir=."]), resolve=False)


def effective_config(experiment: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The composed ``train`` config of ``experiment`` over ``base`` (default :func:`base_config`),
    with signature defaults filled in."""
    cfg = compose_train([f"experiment={experiment}", "output_dir=."])
    tree = _over(OmegaConf.to_container(cfg, resolve=False), base_config() if base is None else base)
    return _with_defaults(without_ignored(tree))


def without_ignored(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the ``IGNORED_KEYS`` (dotted paths)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for key in IGNORED_KEYS:
        head, _, leaf = key.rpartition(".")
        node = out.get(head) if head else out
        if isinstance(node, dict):
            node.pop(leaf, None)
    return out


def config_sha(experiment: str, base: dict[str, Any] | None = None) -> str:
    """A short, stable hash of :func:`effective_config`."""
    text = json.dumps(effective_config(experiment, base), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:SHA_LENGTH]


def _over(tree: Any, base: Any) -> Any:
    """``tree`` with the keys it lacks taken from ``base`` (recursively, dicts only)."""
    if not (isinstance(tree, dict) and isinstance(base, dict)):
        return tree
    merged = {k: _over(v, base.get(k)) for k, v in tree.items()}
    for key, value in base.items():
        merged.setdefault(key, value)
    return merged


def _with_defaults(node: Any) -> Any:
    if isinstance(node, list):
        return [_with_defaults(v) for v in node]
    if not isinstance(node, dict):
        return node
    filled = {k: _with_defaults(v) for k, v in node.items()}
    target = filled.get("_target_")
    if isinstance(target, str):
        for name, value in _signature_defaults(target).items():
            filled.setdefault(name, value)
    return filled


def _signature_defaults(target: str) -> dict[str, Any]:
    """The plain (JSON-writable) keyword defaults of ``target``."""
    try:
        params = inspect.signature(get_object(target)).parameters
    except (TypeError, ValueError):  # no readable signature (an unimportable target raises)
        return {}
    return {n: _plain(p.default) for n, p in params.items()
            if p.default is not inspect.Parameter.empty and _is_plain(p.default)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value
