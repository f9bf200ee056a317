"""``trainer.strategy=fsdp`` in one process that was not launched (FSDP on one GPU: a process group
of one is made), and the one-line refusals where sharding cannot work."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_helpers import tiny_algorithm  # noqa: E402

from stepdistill.cli import main  # noqa: E402
from stepdistill.data.toy2d import ToyMixture  # noqa: E402
from stepdistill.eval.tasks import Toy2DTask  # noqa: E402
from stepdistill.training.optim import OptimConfig  # noqa: E402
from stepdistill.training.settings import TrainerConfig  # noqa: E402
from stepdistill.training.trainer import TaskBatches, Trainer  # noqa: E402


def _fit(out: Path, **config):
    task = Toy2DTask(ToyMixture(modes=3, classes=3, radius=2.0, std=0.15), num_eval=64)
    settings = TrainerConfig(max_steps=6, batch_size=16, checkpoint_every=0, ema_decay=0.9, progress=False,
                             cpu=True, sample_every=0, **config)
    trainer = Trainer(tiny_algorithm(dtype=torch.float64), TaskBatches(task, seed=3), settings,
                      OptimConfig(lr=1e-2), out)
    return trainer.fit()


def test_one_process_fsdp_trains_what_ddp_trains_and_leaves_no_process_group(tmp_path, one_thread):
    ddp = _fit(tmp_path / "ddp")
    fsdp = _fit(tmp_path / "fsdp", strategy="fsdp")
    assert not dist.is_initialized()
    assert [h["loss"] for h in fsdp.history] == pytest.approx([h["loss"] for h in ddp.history], abs=1e-12)
    for name in ("generator", "critic"):
        a, b = getattr(ddp.algorithm, name).state_dict(), getattr(fsdp.algorithm, name).state_dict()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-12
    a, b = ddp.generator.state_dict(), fsdp.generator.state_dict()  # the EMA students
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-12


@pytest.mark.parametrize("override,message", [
    ("trainer.teacher_placement=shard", "trainer.teacher_placement=shard needs trainer.strategy=fsdp or hsdp"),
    ("trainer.strategy=zero3", "trainer.strategy='zero3'; allowed: ddp, fsdp, hsdp"),
    ("trainer.strategy=fsdp trainer.mixed_precision=fp16", "trainer.strategy=fsdp trains in bf16 or fp32"),
    ("experiment=toy2d/agd trainer.strategy=fsdp", "cannot shard AGD's guidance adapters"),
])
def test_bad_strategy_settings_are_one_line_errors(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["train", "experiment=toy2d/dmd2", f"output_dir={out}", *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_accelerates_use_fsdp_flag_points_to_the_strategy_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    assert main(["train", "experiment=toy2d/dmd2", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "launch without --use_fsdp and set trainer.strategy=fsdp" in capsys.readouterr().err


@pytest.mark.parametrize("experiment", ["toy2d/dmd2", "toy2d/fdistill", "toy2d/sid", "toy2d/lcm"])
def test_every_algorithm_trains_the_same_sharded(tmp_path, one_thread, experiment):
    """One process, fsdp against ddp, each algorithm's own state included (f-distill's ratio
    normaliser, LCM's EMA target network updated from the sharded student)."""
    logs = {}
    for strategy in ("ddp", "fsdp"):
        out = tmp_path / strategy
        assert main(["train", f"experiment={experiment}", f"output_dir={out}", f"trainer.strategy={strategy}",
                     "trainer.max_steps=6", "trainer.batch_size=64", "trainer.log_every=1", "trainer.progress=false",
                     "trainer.checkpoint_every=3", "trainer.sample_every=0", "evaluate.enabled=false"]) == 0
        logs[strategy] = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert len(logs["fsdp"]) == 6
    for a, b in zip(logs["ddp"], logs["fsdp"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_sharded_resume_before_a_phases_first_step_and_the_ema_grid_after_a_no_grad_forward(
        tmp_path, one_thread, optimizer):
    """toy2d/dmd2 (two critic steps per generator step): the checkpoint at step 2 holds no generator
    optimizer state yet, and the last step (a critic step: the generator's forward ran without grad)
    ends with the EMA sample grid. Resuming from step 2 gives the uninterrupted losses exactly, with
    torchao's 8-bit AdamW too (eager: the same maths without compiling)."""
    def train(name: str, *extra: str) -> list[float]:
        out = tmp_path / name
        assert main(["train", "experiment=toy2d/dmd2", f"output_dir={out}", "trainer.strategy=fsdp",
                     f"optim.name={optimizer}", "trainer.max_steps=4", "trainer.batch_size=64", "trainer.log_every=1",
                     "trainer.progress=false", "trainer.checkpoint_every=2", "trainer.keep_last=0",
                     "trainer.sample_every=0", "evaluate.enabled=false", *extra]) == 0
        return [json.loads(line)["loss"] for line in (out / "logs.jsonl").read_text().splitlines()]

    with torch.compiler.set_stance("force_eager"):
        whole = train("whole")
        resumed = train("resumed", f"trainer.resume={tmp_path / 'whole/checkpoints/checkpoint-2'}")
    assert resumed == whole[2:]
    assert (tmp_path / "whole/samples/step-000004.png").is_file()
