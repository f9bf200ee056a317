"""One process of the backward-simulation test: ``torchrun --nproc_per_node 2 THIS OUT``.

Each process builds the same 4-step DMD2 (``algo_helpers.tiny_parts``), seeds torch's global RNG by
its rank (as the trainer does: every process draws its own noise), and calls
``DMD2.student_sample`` for optimizer steps 0..STEPS-1. It counts the generator's forward calls per
step (k simulated steps without grad plus the graded one: k + 1) and writes them with the outputs to
``OUT/rank<k>.pt``.
"""

import os
import sys
from pathlib import Path

import torch
from algo_helpers import labelled_batch, tiny_parts

from stepdistill.algorithms.dmd2 import DMD2

STEPS = 24


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    algo = DMD2(*tiny_parts(), seed=7)
    calls = []
    algo.generator.register_forward_hook(lambda *_: calls.append(1))
    cond = labelled_batch(x0=False).cond
    torch.manual_seed(1000 + rank)
    counts, outputs = [], []
    for step in range(STEPS):
        calls.clear()
        outputs.append(algo.student_sample(cond, step, grad=False))
        counts.append(len(calls))
    torch.save({"counts": counts, "outputs": torch.stack(outputs)}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
