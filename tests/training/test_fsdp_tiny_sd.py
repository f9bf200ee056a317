"""``trainer.strategy=fsdp`` on the tiny SD1.5-like stack, launched as the README says
(``torchrun --nproc_per_node 2 -m stepdistill.cli train ...``; gloo, two CPU processes that really
shard): DMD2 with its GAN head, an EMA and a 4-step generator trained by backward simulation (with
gradient checkpointing, against DDP without), LCM-LoRA (adapters on the teacher's own UNet) and DMD2
with a LoRA generator and a LoRA critic on one base.

FSDP against DDP, both two processes with the same seeds: every process draws the same noise under
either strategy, so the only differences are floating-point sums in another order (a reduce-scatter of
gathered shards vs DDP's bucketed all-reduce) in float32. Observed: losses within 7e-7 relative, grad
norms within 3e-6 relative, student weights within 3e-6. We allow 1e-4 relative on losses and norms
and 1e-4 absolute on weights: far above float32 rounding, far below what the faults this guards
against change (a rank's own shard norm instead of the global one is tens of percent off; a stale
requires_grad between phases stops the generator step; an unreduced gradient trains each process on
its own half-batch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from stepdistill.training.sharding import free_port

pytestmark = pytest.mark.slow  # a multi-minute training: `make test-fast` leaves it out

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
DMD2 = ["experiment=test/tiny_sd_dmd2_gan", f"hydra.searchpath=[file://{CONFIGS}]"]
#: the sharded DMD2 run also recomputes its activations (gradient checkpointing inside FSDP units)
SHARDED = ["trainer.strategy=fsdp", "trainer.gradient_checkpointing=true"]
RTOL, ATOL = 1e-4, 1e-4



def _train(out: Path, cache: Path, *overrides: str) -> list[dict]:
    """``torchrun --nproc_per_node 2 -m stepdistill.cli train ...``; returns logs.jsonl's records."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               STEPDISTILL_CACHE=str(cache))
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "stepdistill.cli", "train", f"output_dir={out}", "trainer.progress=false",
            *overrides]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def dmd2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    fsdp = _train(root / "fsdp", root / "cache", *DMD2, *SHARDED)
    ddp = _train(root / "ddp", root / "cache", *DMD2, "trainer.strategy=ddp")
    return root, fsdp, ddp


def test_fsdp_trains_what_ddp_trains_with_the_gan_head_ema_and_backward_simulation(dmd2_runs):
    root, fsdp, ddp = dmd2_runs
    train = json.loads((root / "fsdp/train.json").read_text())
    assert (train["strategy"], train["num_processes"], train["ema"]) == ("fsdp", 2, True)
    assert [r["phase"] for r in fsdp] == ["critic", "generator"] * 2
    assert all(r["gan_critic_loss"] > 0 for r in fsdp if r["phase"] == "critic")
    for a, b in zip(fsdp, ddp, strict=True):
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"]), (a, b)
        assert a["grad_norm"] > 0
    # the exported (EMA) student: whole tensors, the teacher's shapes, DDP's values
    student = load_file(root / "fsdp/student/unet/diffusion_pytorch_model.safetensors")
    reference = load_file(root / "ddp/student/unet/diffusion_pytorch_model.safetensors")
    assert student.keys() == reference.keys()
    assert max((student[k] - reference[k]).abs().max().item() for k in student) <= ATOL


def test_the_sharded_students_export_loads_in_plain_diffusers_with_the_teachers_shapes(dmd2_runs, tmp_path):
    from stepdistill.cli import main
    from stepdistill.tiny_stacks import tiny_stack_dir

    root, _, _ = dmd2_runs
    teacher = UNet2DConditionModel.from_pretrained(tiny_stack_dir("sd15") / "unet").state_dict()
    student = UNet2DConditionModel.from_pretrained(root / "fsdp/student/unet").state_dict()
    assert {k: v.shape for k, v in student.items()} == {k: v.shape for k, v in teacher.items()}
    assert any(not torch.equal(student[k], teacher[k]) for k in student)  # it trained
    assert main(["export", f"run={root / 'fsdp'}", "format=diffusers", f"out={tmp_path / 'export'}"]) == 0
    exported = UNet2DConditionModel.from_pretrained(tmp_path / "export/unet").state_dict()
    assert all(torch.equal(exported[k], student[k]) for k in student)


def test_the_ema_in_the_sharded_checkpoint_is_the_exported_student(dmd2_runs, tmp_path):
    """The last checkpoint's EMA shards, gathered by torch's own converter, equal the student."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, _, _ = dmd2_runs
    dcp_to_torch_save(root / "fsdp/checkpoints/checkpoint-4/sharded", tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    student = load_file(root / "fsdp/student/unet/diffusion_pytorch_model.safetensors")
    ema = {k.removeprefix("denoiser.backbone."): v for k, v in state["ema"].items()}
    assert ema.keys() == student.keys()
    assert all(torch.equal(ema[k], student[k]) for k in student)
    assert state["model.critic"]["head.net.0.weight"].dim() == 4  # the GAN head, whole


def test_resuming_from_a_sharded_checkpoint_continues_the_loss_trajectory(dmd2_runs):
    root, fsdp, _ = dmd2_runs
    resumed = _train(root / "resumed", root / "cache", *DMD2, *SHARDED,
                     f"trainer.resume={root / 'fsdp/checkpoints/checkpoint-2'}")
    assert [r["step"] for r in resumed] == [2, 3]
    for a, b in zip(fsdp[2:], resumed, strict=True):
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"]), (a, b)


@pytest.mark.parametrize("experiment,extra", [
    ("tiny_sd/lcm_lora", []),
    ("tiny_sd/dmd2_lora", ["algorithm.critic_updates_per_generator_update=1"]),
])
def test_lora_roles_on_one_sharded_base_train_as_ddp_does_and_export(tmp_path, experiment, extra):
    """LCM-LoRA (the student's adapters and the teacher in one sharded UNet) and DMD2 with a LoRA
    generator and a LoRA critic (two adapters and the teacher on one sharded base)."""
    lora = [f"experiment={experiment}", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1",
            "evaluate.enabled=false", *extra]
    run = tmp_path / "fsdp"
    fsdp = _train(run, tmp_path / "cache", *lora, "trainer.strategy=fsdp")
    ddp = _train(tmp_path / "ddp", tmp_path / "cache", *lora)
    assert json.loads((run / "train.json").read_text())["strategy"] == "fsdp"
    for a, b in zip(fsdp, ddp, strict=True):
        assert _close(a["loss"], b["loss"]) and _close(a["grad_norm"], b["grad_norm"]) and a["grad_norm"] > 0, (a, b)
    from stepdistill.cli import main

    assert main(["export", f"run={run}", "format=lora", f"out={tmp_path / 'lora'}"]) == 0
    exported = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    reference = load_file(tmp_path / "ddp" / "student" / "lora" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == reference.keys() and not any("critic" in k for k in exported)
    assert max((exported[k] - reference[k]).abs().max().item() for k in exported) <= ATOL
