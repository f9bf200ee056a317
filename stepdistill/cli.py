"""``stepdistill <command> [key=value ...]``: the command-line surface.

User errors print one line (``stepdistill: error: ...``) and exit with status 2, no traceback.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from stepdistill.errors import StepdistillError

USAGE = """usage: stepdistill <command> [key=value ...]

commands:
  teacher train dataset=toy2d|digits output_dir=DIR [data.*=...]   train a teacher
  teacher eval  dataset=toy2d|digits output_dir=DIR [steps=[1,2,4]] teacher metrics vs steps
  train         experiment=DATASET/NAME output_dir=DIR [k=v ...]   distil a teacher
                (trainer.resume=auto continues a run; logger=wandb|tensorboard)
  demo          [output_dir=DIR] [key=value ...]                    DMD2 on digits (train + report)
  sample        run=DIR [steps=K] [num_images=N] [seed=S] [out=DIR] a run's student: PNGs + grid.png
  export        run=DIR format=diffusers [out=DIR] [steps=K]        a directory diffusers loads
  eval          run=DIR [steps=K] [num_samples=N] [teacher_steps=50] metrics.json + report.md
  eval-fid      real=DIR|STATS.npz fake=DIR|RUN feature=inception|digits|MODULE [out=JSON]
                                                                    FID, KID, precision/recall
  eval-clip     images=DIR prompts=FILE clip=CLIP_DIR [out=JSON]    CLIP score of images vs prompts
  eval-coco     run=DIR protocol=coco2017_5k|coco2017_10k|coco2014_30k captions=FILE images=DIR
                clip=CLIP_DIR [inception_path=FILE]                 COCO FID + CLIP score of a student
  bench         quality|speed|overhead|memory output_dir=DIR [dataset=toy2d|digits]
                                                                    JSON + markdown table + PNG plot
  plan          experiment=E|backbone=B gpus=N gpu_memory=80GB [k=v ...] [out=plan.json]
                                                                    per-GPU memory: does the job fit?
  cache         data=... teacher.path=DIR out=DIR                   prompt embeddings (+ latents) once
"""


def _module_main(module: str, entry: str = "run") -> Callable[[Sequence[str]], None]:
    """A command whose code lives in ``module`` (imported on use) as ``entry(overrides)``."""

    def command(overrides: Sequence[str]) -> None:
        getattr(importlib.import_module(module), entry)(overrides)

    return command


COMMANDS: dict[tuple[str, ...], Callable[[Sequence[str]], None]] = {
    ("teacher", "train"): _module_main("stepdistill.commands.teacher", "run_train"),
    ("teacher", "eval"): _module_main("stepdistill.commands.teacher", "run_eval"),
    ("train",): _module_main("stepdistill.commands.train"),
    ("demo",): _module_main("stepdistill.commands.demo"),
    ("sample",): _module_main("stepdistill.commands.sample"),
    ("export",): _module_main("stepdistill.commands.export"),
    ("eval",): _module_main("stepdistill.commands.evaluate"),
    ("eval-fid",): _module_main("stepdistill.commands.eval_fid"),
    ("eval-clip",): _module_main("stepdistill.commands.eval_clip"),
    ("eval-coco",): _module_main("stepdistill.commands.eval_coco"),
    ("bench", "quality"): _module_main("stepdistill.bench.quality"),
    ("bench", "speed"): _module_main("stepdistill.bench.speed"),
    ("bench", "overhead"): _module_main("stepdistill.bench.overhead"),
    ("bench", "memory"): _module_main("stepdistill.bench.memory"),
    ("plan",): _module_main("stepdistill.commands.plan"),
    ("cache",): _module_main("stepdistill.commands.cache"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    words = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    command = COMMANDS.get(tuple(words))
    if command is None:
        print(f"stepdistill: error: unknown command {' '.join(words)!r}; commands: "
              f"{', '.join(' '.join(k) for k in COMMANDS)}", file=sys.stderr)
        return 2
    try:
        command(overrides)
    except StepdistillError as e:
        print(f"stepdistill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stepdistill: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
