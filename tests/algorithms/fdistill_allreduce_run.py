"""One process of the f-distill all-reduce test: ``torchrun --nproc_per_node 2 THIS OUT``.

Each process feeds its own slice of one global batch of (r, t) to a ``RatioNormalizer`` and
``normalized_f_weight`` (gloo, CPU) twice, and writes its normaliser state and weights to
``OUT/rank<k>.pt``.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stepdistill.algorithms.fdistill import RatioNormalizer, normalized_f_weight

PER_PROCESS = 8


def global_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t) of a global batch of 2 * PER_PROCESS; rank k takes rows k*PER_PROCESS:(k+1)*PER_PROCESS."""
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 5 * torch.rand(2 * PER_PROCESS, generator=g), torch.rand(2 * PER_PROCESS, generator=g)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    normalizer, weights = RatioNormalizer(bins=10, momentum=0.5), []
    for seed in (0, 1):
        r, t = global_batch(seed)
        local = slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS)
        weights.append(normalized_f_weight(r[local], t[local], normalizer, "forward_kl")[0])
    torch.save({"state": normalizer.state_dict(), "weights": weights, "world_size": dist.get_world_size()},
               out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
