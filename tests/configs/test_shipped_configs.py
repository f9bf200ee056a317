"""Every shipped config composes, and every ``_target_`` node's keys bind to its target's signature."""

import inspect

import pytest
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig

from stepdistill.config import RENAMED_KEYS, compose, compose_train, configs_dir, experiments
from stepdistill.errors import StepdistillError

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
SHIPPED += [("teacher", [f"dataset={d}", "output_dir=x"]) for d in ("toy2d", "digits", "toy2d_imbalanced")]


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


def test_teacher_recipes_are_chosen_with_dataset_and_guide_with_teacher_guidance_scale():
    """``dataset=`` (the documented selector) picks configs/teacher_recipe/<name>.yaml; the CFG scale is
    ``teacher.guidance_scale`` there as in every experiment."""
    by_alias = compose("teacher", ["dataset=toy2d", "teacher.guidance_scale=2.0"])
    by_group = compose("teacher", ["teacher_recipe=toy2d", "teacher.guidance_scale=2.0"])
    assert by_alias == by_group and by_alias.teacher.guidance_scale == 2.0 and "guidance_scale" not in by_alias
    with pytest.raises(StepdistillError, match=r"^unknown dataset 'nope'; allowed: digits, toy2d"):
        compose("teacher", ["dataset=nope"])


@pytest.mark.parametrize("override", ["guidance_scale=2", "+guidance_scale=2"])
def test_a_renamed_key_is_a_one_line_error_naming_its_new_name(override):
    assert RENAMED_KEYS["teacher"] == {"guidance_scale": "teacher.guidance_scale"}
    with pytest.raises(StepdistillError) as err:
        compose("teacher", ["dataset=digits", override])
    assert str(err.value) == "guidance_scale was renamed teacher.guidance_scale: write teacher.guidance_scale=2"


def test_composed_roles_carry_their_signature_defaults():
    """Group and experiment files state only what differs from a signature; the composed config (and a
    run's config.yaml) still names every effective value."""
    cfg = compose_train(["experiment=toy2d/lcm", "output_dir=x"])
    assert cfg.generator.solver_steps == 50 and cfg.generator.steps == 4  # ConsistencyGenerator's defaults
    assert cfg.algorithm.target_decay == 0.95 and cfg.algorithm.loss == "huber"
    assert "copy" not in cfg.generator and "teacher" not in cfg.algorithm  # build-time arguments stay out


def test_experiment_files_are_short():
    """An experiment is its data, teacher and method plus the keys that differ: 30 lines at most, apart
    from the real-size recipes (sd15/, sdxl/) whose headers document a paper's settings."""
    root = configs_dir() / "experiment"
    for path in root.rglob("*.yaml"):
        if path.parent.name in ("sd15", "sdxl"):
            continue
        assert len(path.read_text().splitlines()) <= 30, path.relative_to(root)


def test_a_signature_default_the_yaml_does_not_state_can_be_overridden():
    """``algorithm.divergence=forward_kl`` (toy2d/fdistill's documented command) works although the
    experiment keeps f-distill's default; a misspelt key is still refused."""
    cfg = compose_train(["experiment=toy2d/fdistill", "output_dir=x", "algorithm.divergence=forward_kl",
                         "generator.lora_rank=4", "critic.head_width=16"])
    assert (cfg.algorithm.divergence, cfg.generator.lora_rank, cfg.critic.head_width) == ("forward_kl", 4, 16)
    with pytest.raises(StepdistillError, match="unknown config key 'algorithm.divergnce'"):
        compose_train(["experiment=toy2d/fdistill", "output_dir=x", "algorithm.divergnce=js"])
