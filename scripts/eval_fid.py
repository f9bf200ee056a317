"""Thin entry script: ``python scripts/eval_fid.py real=DIR|STATS.npz fake=DIR|RUN [feature=inception|digits|MODULE]
[out=JSON]``.

Runs ``stepdistill.commands.eval_fid.run`` through the CLI (``stepdistill eval-fid``): the same output,
one-line errors and exit status 2.
"""

import sys

from stepdistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval-fid", *sys.argv[1:]]))
