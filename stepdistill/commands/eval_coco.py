"""``stepdistill eval-coco run=DIR protocol=NAME captions=FILE images=DIR [clip=CLIP_DIR] [k=v ...]``.

Runs a COCO protocol (``configs/eval/<protocol>.yaml``: coco2014_30k, coco2017_5k, coco2017_10k) on a
run's text-to-image student: FID (Inception) and CLIP score, written to
``<run>/eval/<protocol>/coco_metrics.json`` (see ``stepdistill.eval.coco``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from stepdistill.args import parse_args
from stepdistill.config import configs_dir, instantiate
from stepdistill.errors import StepdistillError
from stepdistill.eval.coco import evaluate_coco

KEYS = {"run": "str", "protocol": "str", "captions": "str", "images": "str", "clip": "str",
        "inception_path": "str", "num_images": "int", "steps": "int", "batch_size": "int", "seed": "int",
        "eval_resolution": "int", "feature": "str", "progress": "bool"}
#: keys that override the protocol's own settings
PROTOCOL_KEYS = ("captions", "images", "num_images", "seed", "eval_resolution", "feature")


def protocols() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "eval").glob("coco*.yaml"))


def load_protocol(name: str | None, overrides: dict[str, Any]):
    """The protocol ``configs/eval/<name>.yaml`` with ``overrides`` applied, as a ``CocoProtocol``."""
    if name not in protocols():
        raise StepdistillError(f"unknown protocol {name!r}; allowed: {', '.join(protocols())} (protocol=NAME)")
    node = OmegaConf.load(configs_dir() / "eval" / f"{name}.yaml")
    for key, value in overrides.items():
        node[key] = value
    return instantiate(node)


def run(overrides: Sequence[str]) -> dict:
    args = parse_args(overrides, KEYS, "eval-coco")
    if not args.get("run"):
        raise StepdistillError("run=DIR is required: the training run whose student to evaluate")
    protocol = load_protocol(args.get("protocol"), {k: args[k] for k in PROTOCOL_KEYS if k in args})
    metrics = evaluate_coco(args["run"], protocol, clip_dir=args.get("clip"),
                            inception_path=args.get("inception_path"), steps=args.get("steps"),
                            batch_size=args.get("batch_size", 16), progress=args.get("progress", True))
    clip = f", CLIP score {metrics['clip_score']:.4g}" if "clip_score" in metrics else ""
    print(f"{protocol.name}: FID {metrics['fid']:.4g}{clip} ({protocol.num_images} images, "
          f"{metrics['steps']} steps); {metrics['run']}/eval/{protocol.name}/coco_metrics.json")
    return metrics
