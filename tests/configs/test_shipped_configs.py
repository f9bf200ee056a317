"""Every shipped config composes, and every ``_target_`` node's keys bind to its target's signature."""

import inspect

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from stepdistill.config import compose, experiments

#: runtime objects the commands pass to ``instantiate`` as keyword arguments (not in the YAML)
RUNTIME_KWARGS = {"denoiser", "teacher", "generator", "critic", "data"}


def _target_nodes(node, path="") -> list[tuple[str, DictConfig]]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path or "<root>", node))
        for key in node:
            found += _target_nodes(node[key], f"{path}.{key}".strip("."))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            found += _target_nodes(item, f"{path}[{i}]")
    return found


def _check_binds(path: str, node: DictConfig) -> None:
    target = get_object(node._target_)
    signature = inspect.signature(target)
    keys = [k for k in node if not str(k).startswith("_")]
    params = signature.parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in keys if k not in params]
        assert not unknown, f"{path}: {node._target_} has no parameter(s) {unknown}"
    required = [n for n, p in params.items() if p.default is p.empty and n != "self"
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [n for n in required if n not in keys and n not in RUNTIME_KWARGS]
    assert not missing, f"{path}: {node._target_} needs {missing}"


SHIPPED = [("train", [f"experiment={e}", "output_dir=x"]) for e in experiments()]
SHIPPED += [("teacher", [f"dataset={d}", "output_dir=x"]) for d in ("toy2d", "digits")]


def test_every_experiment_is_listed():
    assert {"toy2d/dmd2", "digits/dmd2"} <= set(experiments())


@pytest.mark.parametrize("name,overrides", SHIPPED, ids=[o[0] for _, o in SHIPPED])
def test_shipped_config_composes_and_binds(name, overrides):
    cfg = compose(name, overrides)
    nodes = _target_nodes(cfg)
    assert nodes, "no _target_ nodes"
    for path, node in nodes:
        _check_binds(path, node)


def test_digits_experiments_evaluate_over_four_noise_seeds():
    """The digits FID moves with the noise drawn: its experiments average noise seeds 0-3; toy2d's one."""
    for experiment in experiments():
        cfg = compose("train", [f"experiment={experiment}", "output_dir=x"])
        expected = [0, 1, 2, 3] if experiment.startswith("digits/") else None
        assert cfg.evaluate.noise_seeds == expected, experiment
