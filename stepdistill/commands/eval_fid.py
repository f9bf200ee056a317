"""``stepdistill eval-fid real=DIR|STATS.npz fake=DIR|RUN [feature=inception|digits|MODULE] [out=JSON]
[inception_path=FILE] [batch_size=32] [num_fake=N] [seed=0] [device=cpu|cuda]``: FID, KID, precision/recall.

Computes :func:`stepdistill.eval.fid.compute_fid` (image protocol, feature networks and statistics
cache are described there and in ``stepdistill.eval.images`` / ``features`` / ``fid_stats``), prints
``FID x (n_real real, n_fake fake, feature)`` and the other metrics, and writes the result as JSON
to ``out`` if given (``{"fid", "kid_mean", "kid_std", "precision", "recall", "n_real", "n_fake",
"feature", "protocol", "real", "fake"}``). Nothing is written when something fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stepdistill.args import parse_args
from stepdistill.errors import StepdistillError
from stepdistill.eval.fid import compute_fid

KEYS: dict[str, str] = {"real": "str", "fake": "str", "feature": "str", "inception_path": "str", "out": "str",
                        "batch_size": "int", "num_fake": "int", "seed": "int", "device": "str"}
USAGE = "stepdistill eval-fid real=DIR|STATS.npz fake=DIR|RUN feature=inception|digits|MODULE [out=JSON]"


def run(overrides: Sequence[str]) -> dict[str, Any]:
    """Compute, print and (with ``out``) write the metrics; returns them."""
    args = parse_args(overrides, KEYS, "eval-fid")
    for key in ("real", "fake"):
        if not args.get(key):
            raise StepdistillError(f"{key}= is required: {USAGE}")
    out = Path(args["out"]).expanduser() if args.get("out") else None
    if out is not None and out.is_dir():
        raise StepdistillError(f"out {str(out)!r} is a directory; pass a JSON file path")
    num_fake = args.get("num_fake")
    if num_fake is not None and num_fake < 2:
        raise StepdistillError(f"num_fake must be >= 2; got {num_fake}")
    result = compute_fid(args["real"], args["fake"], args.get("feature", "inception"),
                         inception_path=args.get("inception_path"), batch_size=args.get("batch_size", 32),
                         num_fake=num_fake, seed=args.get("seed", 0), device=args.get("device"))
    result = {**result, "real": args["real"], "fake": args["fake"]}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
    print(f"FID {result['fid']:.4f} ({result['n_real']} real, {result['n_fake']} fake, {result['feature']})")
    if result["kid_mean"] is not None:
        recall = f"{result['recall']:.4f}" if result["recall"] is not None else "n/a"
        precision = f"{result['precision']:.4f}" if result["precision"] is not None else "n/a"
        print(f"KID {result['kid_mean']:.6f} +- {result['kid_std']:.6f}, precision {precision}, recall {recall}")
    if out is not None:
        print(f"written to {out}")
    return result
