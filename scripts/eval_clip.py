"""Thin entry script: ``python scripts/eval_clip.py images=DIR prompts=FILE clip=CLIP_DIR [out=JSON]``.

Runs ``stepdistill.commands.eval_clip.run`` through the CLI (``stepdistill eval-clip``): the same
output, one-line errors and exit status 2.
"""

import sys

from stepdistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval-clip", *sys.argv[1:]]))
