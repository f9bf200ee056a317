"""Train TinyAlgorithm (float64, no RNG in the loss) with the Trainer on the CPU; the main process
writes the loss history and final generator / critic parameters to ``<out>/result.pt``.

Run as ``python multiprocess_run.py OUT [RESUME [STRATEGY]]`` (one process) or under ``accelerate
launch --multi_gpu --num_processes 2 ...`` / ``torchrun --nproc_per_node 2`` (two processes, same
global batch); RESUME is a checkpoint to continue from (``trainer.resume``; ``none``: start), STRATEGY
``trainer.strategy`` (default ddp). The result also holds every step's gradient norm (logs.jsonl).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from trainer_helpers import tiny_algorithm  # noqa: E402

from stepdistill.data.toy2d import ToyMixture  # noqa: E402
from stepdistill.eval.tasks import Toy2DTask  # noqa: E402
from stepdistill.training.optim import OptimConfig  # noqa: E402
from stepdistill.training.settings import TrainerConfig  # noqa: E402
from stepdistill.training.trainer import TaskBatches, Trainer  # noqa: E402

STEPS, BATCH, ACCUMULATION = 12, 32, 2


def main(out: Path, resume: str | None, strategy: str = "ddp") -> None:
    torch.set_num_threads(1)
    task = Toy2DTask(ToyMixture(modes=3, classes=3, radius=2.0, std=0.15), num_eval=64)
    algorithm = tiny_algorithm(dtype=torch.float64)
    config = TrainerConfig(max_steps=STEPS, batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                           checkpoint_every=STEPS // 2, keep_last=0, ema_decay=0.9, progress=False, cpu=True,
                           sample_every=0, num_samples=64, resume=resume, strategy=strategy, log_every=1)
    # the trainer builds Accelerator(cpu=True, ...) from the config, as `stepdistill train` does
    trainer = Trainer(algorithm, TaskBatches(task, seed=3), config, OptimConfig(lr=1e-2, warmup_steps=3),
                      out / "run", task=task)  # a sample grid of the (EMA) generator at the end
    accelerator = trainer.accelerator
    result = trainer.fit()
    if accelerator.is_main_process:
        logs = [json.loads(line) for line in (out / "run/logs.jsonl").read_text().splitlines()]
        torch.save({"history": result.history, "num_processes": accelerator.num_processes,
                    "grad_norms": {line["step"]: line["grad_norm"] for line in logs},
                    "bucket_view": getattr(trainer.prepared["critic"], "gradient_as_bucket_view", None),
                    "train": json.loads((out / "run/train.json").read_text()),
                    "start_step": result.start_step,
                    "generator": {k: v.cpu() for k, v in result.algorithm.generator.state_dict().items()},
                    "critic": {k: v.cpu() for k, v in result.algorithm.critic.state_dict().items()},
                    "ema": {k: v.cpu() for k, v in result.ema.model.state_dict().items()},
                    "student": {k: v.cpu() for k, v in result.generator.state_dict().items()}},
                   out / "result.pt")


if __name__ == "__main__":
    resume = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "none" else None
    main(Path(sys.argv[1]), resume, *sys.argv[3:4])
