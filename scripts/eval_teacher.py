"""Thin entry script: ``python scripts/eval_teacher.py dataset=digits output_dir=DIR [steps=[1,4,16]]``."""

import sys

from stepdistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["teacher", "eval", *sys.argv[1:]]))
