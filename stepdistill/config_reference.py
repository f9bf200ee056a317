"""The config reference (``docs/configs.md``), generated from ``configs/`` and the code it builds.

``python -m stepdistill.config_reference`` rewrites the page; a test checks that the committed page
is what this module generates. For every config file: each key, its default, and its one-line meaning.
A key's meaning is the ``Args:`` entry of the docstring of the ``_target_`` that receives it, else the
YAML comment on or above it. Keys a ``_target_`` accepts that the file leaves to the signature are
listed with the signature's default.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import get_object
from omegaconf import OmegaConf

from stepdistill.config import configs_dir

PAGE = Path(__file__).resolve().parents[1] / "docs" / "configs.md"
#: (config group directory, title, one line on what selects it); the top-level files come first
GROUPS = (
    ("trainer", "trainer/", "`trainer=NAME`: the training loop (`trainer.*` keys)"),
    ("optim", "optim/", "`optim=NAME`: one optimizer per phase; `optim.<phase>.<key>` overrides one phase"),
    ("logger", "logger/", "`logger=none|wandb|tensorboard`"),
    ("algorithm", "algorithm/", "the methods: an experiment's defaults list picks one (`- /algorithm: dmd2`)"),
    ("generator", "generator/", "the student role (`- /generator: NAME`)"),
    ("critic", "critic/", "the fake-score role (`- /critic: NAME`)"),
    ("lora", "lora/", "LoRA target modules shared by the LoRA experiments"),
    ("trajectories", "trajectories/", "AGD's teacher trajectories"),
    ("data", "data/", "the training data and evaluation task (`- /data: NAME`)"),
    ("eval", "eval/", "the COCO protocols of `stepdistill eval-coco protocol=NAME`"),
    ("teacher_recipe", "teacher_recipe/", "`stepdistill teacher train|eval dataset=NAME`: the shipped teachers' recipes"),
)
#: keys read by the workflows rather than passed to a ``_target_`` (their one home for a meaning)
KEY_MEANINGS = {
    "output_dir": "the run (or teacher) directory to write; required",
    "data": "the training data and evaluation task node (an experiment picks it with `- /data: NAME`)",
    "task": "the evaluation task node (null: the one the data node names)",
    "algorithm": "the method node (an experiment picks it with `- /algorithm: NAME`)",
    "critic": "the critic node (null: the method trains no critic)",
    "teacher.path": "a local diffusers directory (pipeline or model) of the teacher; hub ids are refused",
    "teacher.guidance_scale": "the teacher's classifier-free guidance scale (1: none; [lo, hi]: random per sample)",
    "evaluate.enabled": "evaluate student and teacher after training (metrics.json, report.md)",
    "evaluate.teacher_steps": "the teacher's step count in the evaluation",
    "evaluate.batch_size": "the evaluation's sampling batch",
    "seed": "seeds the teacher's training and evaluation",
    "steps": "the teacher's step counts that `stepdistill teacher eval` measures",
    "model.channels": "the UNet's channels per resolution",
    "model.layers_per_block": "ResNet layers per UNet block",
    "model.num_classes": "class labels (one more is the CFG null class)",
    "model.norm_groups": "GroupNorm groups",
    "model.hidden": "the MLP's width",
    "model.blocks": "residual blocks of the MLP",
    "scheduler.beta_schedule": "the DDPM beta schedule (as diffusers' DDPMScheduler)",
    "scheduler.beta_start": "the first beta",
    "scheduler.beta_end": "the last beta",
    "scheduler.prediction_type": "what the network predicts (epsilon, v_prediction, sample)",
    "scheduler.shift": "flow matching's time shift (1: none)",
    "train.steps": "optimizer steps of the teacher's training",
    "train.batch_size": "the teacher's training batch",
    "train.lr": "the teacher's learning rate",
    "train.warmup": "linear warmup steps",
    "train.class_dropout": "share of labels replaced by the null class (for CFG)",
    "train.ema_decay": "EMA decay of the teacher's weights",
    "train.seed": "the training seed",
    "train.weight_decay": "AdamW weight decay",
    "train.grad_clip": "gradient-norm clipping (null: none)",
    "lora_alpha": "LoRA scale numerator (scale = alpha / rank; default: the rank)",
    "lora_target_modules": "the modules that get LoRA adapters",
    "copy": "train a copy of the teacher's denoiser (false: the given one itself); set by the workflow",
    "generator.copy": "train a copy of the teacher's denoiser (false: the given one itself); set by the workflow",
    "lora_rank": "LoRA rank R: the role trains LoRA adapters on the teacher's frozen base (null: a full copy)",
    "huber_c": "pseudo-Huber constant c (null: the loss's own default)",
    "t_max": "where the generator's first step starts (t in [0, 1]; standard normal noise taken as x_t there)",
    "kind": "where the adapters go (cross-attention or offset)",
    "dim": "the guidance embedding's width",
    "attn_dim": "the adapters' attention width",
    "heads": "the adapters' attention heads",
    "target_modules": "the modules that get adapters",
    "sigma_data": "the data's standard deviation in the boundary scalings (0.5, as LCM)",
    "guidance_scale": "the CFG scale the generator is trained to reproduce",
    "guidance_embedding_dim": "width of the guidance-scale embedding fed to the UNet (null: none)",
    "timestep_scaling": "the consistency boundary scalings' timestep factor (null: the network's x0 as it is)",
    "sampler": "renoise (LCM: fresh noise between steps) or ode (multistep CD: deterministic jumps)",
}
_ARG = re.compile(r"^(\s*)([A-Za-z_][\w, ]*?):\s+(.*)$")
_KEY = re.compile(r"^(\s*)([A-Za-z_][\w.]*):(?:\s+|$)")


def render() -> str:
    """The whole page."""
    root = configs_dir()
    out = ["# Config reference\n",
           "<!-- generated by `python -m stepdistill.config_reference` from configs/ and the code; "
           "a test keeps it current: edit those, not this page -->\n",
           "Configs compose Hydra-style: `configs/train.yaml` (for `stepdistill train`) and `configs/teacher.yaml` "
           "(for `stepdistill teacher`) pick one file from each group below; an experiment "
           "(`configs/experiment/<dataset>/<name>.yaml`) picks its data, method and roles in its defaults list "
           "and overrides only what differs. Any key can be overridden on the command line "
           "(`trainer.max_steps=2000`); a misspelt key is a one-line error. A key a file leaves out takes the "
           "default of the Python signature that receives it (marked *signature*).\n"]
    for name in ("train.yaml", "teacher.yaml"):
        out.append(_section(f"## `{name}`", root / name))
    for group, title, line in GROUPS:
        files = sorted((root / group).glob("*.yaml")) if (root / group).is_dir() else []
        if not files:
            continue
        out.append(f"## `{title}`\n\n{line}.\n")
        out += [_section(f"### `{group}/{f.stem}`", f) for f in files]
    out.append(_experiments(root))
    return "\n".join(out)


def _section(heading: str, path: Path) -> str:
    rows = list(_rows(path))
    header = _header(path)
    lines = [heading + "\n"] + ([header + "\n"] if header else [])
    if rows:
        lines += ["| key | default | meaning |", "|---|---|---|"]
        lines += [f"| `{k}` | {_cell(v)} | {m} |" for k, v, m in rows]
    return "\n".join(lines) + "\n"


def _header(path: Path) -> str:
    """The file's leading comment lines (without ``@package`` and command lines)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("@package"):
            lines.append(text)
    return " ".join(lines).replace("|", "\\|")


def _rows(path: Path) -> Iterator[tuple[str, Any, str]]:
    """``(dotted key, default, meaning)`` for every leaf of ``path`` and every signature key it leaves out.
    A key no docstring or comment of its own file explains takes the comment of the same key in
    ``train.yaml`` (files under ``# @package _global_`` set its keys), then its enclosing target's entry
    for the same name (``optim.critic.lr`` is ``optim.lr`` for one phase)."""
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    comments = {**yaml_comments(configs_dir() / "train.yaml"), **yaml_comments(path)}
    yield from _walk(tree, "", comments, {})


def _walk(node: dict[str, Any], prefix: str, comments: dict[str, str],
          enclosing: dict[str, str]) -> Iterator[tuple[str, Any, str]]:
    target = node.get("_target_")
    documented = target_args(target) if isinstance(target, str) else {}
    for key, value in node.items():
        if key in ("defaults", "_target_"):
            continue
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _walk(value, dotted + ".", comments, documented or enclosing)
            continue
        yield dotted, value, (documented.get(key) or comments.get(dotted) or enclosing.get(key)
                              or KEY_MEANINGS.get(dotted) or KEY_MEANINGS.get(key, ""))
    if isinstance(target, str):
        yield prefix + "_target_", target, "the class or function these keys build"
        for name, default in signature_defaults(target).items():
            if name not in node:
                meaning = documented.get(name) or KEY_MEANINGS.get(f"{prefix}{name}") or KEY_MEANINGS.get(name, "")
                yield f"{prefix}{name}", default, f"{meaning} *signature*".strip()


def target_args(target: str) -> dict[str, str]:
    """``{argument: meaning}`` from the ``Args:`` section of ``target``'s docstring (class or ``__init__``)."""
    try:
        obj = get_object(target)
    except Exception:
        return {}
    docs = [inspect.getdoc(obj) or ""]
    if inspect.isclass(obj):
        docs.append(inspect.getdoc(obj.__init__) or "")
    found: dict[str, str] = {}
    for doc in docs:
        found.update({k: v for k, v in parse_args_section(doc).items() if k not in found})
    return found


def parse_args_section(doc: str) -> dict[str, str]:
    """Google-style ``Args:`` entries; ``a, b: text`` documents both; continuation lines are joined."""
    lines = doc.splitlines()
    if "Args:" not in [line.strip() for line in lines]:
        return {}
    start = [line.strip() for line in lines].index("Args:") + 1
    entries: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            continue
        match = _ARG.match(line)
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        if match and depth == indent:
            names = [n.strip() for n in match.group(2).split(",")]
            for n in names:
                entries[n] = match.group(3).strip()
        elif names:
            for n in names:
                entries[n] += " " + line.strip()
    return {k: v.replace("|", "\\|") for k, v in entries.items()}


def signature_defaults(target: str) -> dict[str, Any]:
    """The keyword arguments of ``target`` with a default (runtime objects without one are left out)."""
    try:
        params = inspect.signature(get_object(target)).parameters
    except Exception:
        return {}
    return {n: p.default for n, p in params.items()
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


def yaml_comments(path: Path) -> dict[str, str]:
    """``{dotted key: comment}``: the comment on a key's line, else the comment lines right above it."""
    found: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match or stripped.startswith("-"):
            pending = [] if not stripped else pending
            continue
        depth, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        stack.append((depth, key))
        dotted = ".".join(k for _, k in stack)
        inline = line.split(" #", 1)[1].strip() if " #" in line else ""
        text = inline or " ".join(p for p in pending if p and not p.startswith("@package"))
        if text:
            found[dotted] = text.replace("|", "\\|")
        pending = []
    return found


def _experiments(root: Path) -> str:
    lines = ["## Experiments\n", "`stepdistill train experiment=<dataset>/<name>`; each file's header is the "
             "command that runs it.\n", "| experiment | lines | run |", "|---|---:|---|"]
    for path in sorted((root / "experiment").rglob("*.yaml")):
        name = str(path.relative_to(root / "experiment").with_suffix(""))
        command = next((line.lstrip("# ").strip() for line in path.read_text().splitlines()
                        if line.startswith("# stepdistill ")), "")
        lines.append(f"| `{name}` | {len(path.read_text().splitlines())} | `{command}` |" if command
                     else f"| `{name}` | {len(path.read_text().splitlines())} | |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    text = str(list(value)) if isinstance(value, tuple) else str(value)
    return "`" + text.replace("|", "\\|") + "`"


def write(page: Path = PAGE) -> bool:
    """Rewrite ``page``; returns whether it changed."""
    text = render()
    changed = not page.is_file() or page.read_text() != text
    if changed:
        page.write_text(text)
    return changed


if __name__ == "__main__":
    changed = write(Path(sys.argv[1]) if len(sys.argv) > 1 else PAGE)
    print(f"{PAGE if len(sys.argv) < 2 else sys.argv[1]}: {'updated' if changed else 'already up to date'}")
