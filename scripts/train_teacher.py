"""Thin entry script: ``python scripts/train_teacher.py dataset=digits output_dir=DIR [key=value ...]``."""

import sys

from stepdistill.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["teacher", "train", *sys.argv[1:]]))
