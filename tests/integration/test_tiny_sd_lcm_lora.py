"""LCM-LoRA on the tiny SD1.5 stack (issue 5): the adapters are a small fraction of the UNet, the
teacher shares the student's network (one copy of the base, measured against a full copy), the run
trains, samples, and exports adapters that diffusers' ``load_lora_weights`` reads (the fresh-process
equivalence is in tests/pipelines/test_export.py).

Measured on the tiny SD1.5 stack with tiny_sd/lcm_lora (rank 4 on the LCM-LoRA modules): 72,832
trainable parameters, 9.2% of the UNet's 792,964; parameter memory of teacher + student + EMA target
3.75 MB (LoRA: the base once, the adapters twice) vs 9.52 MB with full copies, 2.5x less.
"""

import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import compose
from stepdistill.denoisers.loading import LORA_WEIGHTS
from stepdistill.workflows.train import build_algorithm


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct tensors (parameters and buffers) a module holds."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module")
def algorithms(one_thread):
    lora = build_algorithm(compose("train", ["experiment=tiny_sd/lcm_lora"]), seed=0)
    full = build_algorithm(compose("train", ["experiment=tiny_sd/lcm_lora", "generator.lora_rank=null"]), seed=0)
    return lora, full


def test_adapters_are_under_a_tenth_of_the_unet(algorithms):
    lora, _ = algorithms
    base = sum(p.numel() for p in lora.teacher.base_parameters())
    trainable = sum(p.numel() for p in lora.parameters_of("generator") if p.requires_grad)
    assert (trainable, base) == (72_832, 792_964)
    assert trainable / base <= 0.10


def test_one_copy_of_the_base_in_memory(algorithms):
    lora, full = algorithms
    base = parameter_bytes(lora.teacher) - sum(p.numel() * 4 for n, p in lora.teacher.named_parameters()
                                               if ".lora_" in n)
    assert lora.generator.denoiser is lora.teacher.denoiser  # the same network
    lora_bytes, full_bytes = parameter_bytes(lora), parameter_bytes(full)
    assert lora_bytes <= 1.25 * base and full_bytes >= 2.9 * base, (lora_bytes, full_bytes, base)
    assert (round(lora_bytes / 1e6, 2), round(full_bytes / 1e6, 2)) == (3.75, 9.52)


def test_lcm_lora_trains_samples_and_exports(tmp_path, one_thread):
    run = tmp_path / "run"
    assert main(["train", "experiment=tiny_sd/lcm_lora", f"output_dir={run}", "trainer.max_steps=6",
                 "trainer.batch_size=4", "trainer.checkpoint_every=3", "trainer.progress=false"]) == 0
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert logs and all("consistency_loss" in r and torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert (run / "student" / "unet" / "config.json").is_file() and (run / "student" / "lora" / LORA_WEIGHTS).is_file()
    assert main(["sample", f"run={run}", "prompt=a red circle", "num_images=2", f"out={tmp_path / 's'}"]) == 0
    assert main(["export", f"run={run}", "format=lora", f"out={tmp_path / 'lora'}"]) == 0
    notes = json.loads((tmp_path / "lora" / "stepdistill_export.json").read_text())
    assert notes["format"] == "lora" and notes["timesteps"] == [999, 759, 499, 259]
