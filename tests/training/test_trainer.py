"""The trainer: exact resume, atomic checkpoints, phase-wise training, the non-finite guard, the
``train`` command's config and output-directory rules, and what a run writes (logs, samples, trackers)."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import trainer_helpers
from trainer_helpers import tiny_algorithm

from stepdistill.cli import main
from stepdistill.data.toy2d import ToyMixture
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.eval.tasks import Toy2DTask
from stepdistill.training.optim import OptimConfig
from stepdistill.training.settings import TrainerConfig
from stepdistill.training.trainer import TaskBatches, Trainer

CONFIGS = Path(__file__).resolve().parent / "configs"
SEARCHPATH = f"hydra.searchpath=[file://{CONFIGS}]"


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    """Each test builds its own Accelerator: forget the process-wide accelerate state afterwards."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def task():
    return Toy2DTask(ToyMixture(modes=3, classes=3, radius=2.0, std=0.15), num_eval=64)


def make_trainer(out, task, algorithm=None, optim=None, **config):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    settings = dict(max_steps=8, batch_size=16, checkpoint_every=0, sample_every=0, num_samples=64,
                    ema_decay=0.9, progress=False, cpu=True, log_every=1)
    settings.update(config)
    algorithm = algorithm if algorithm is not None else tiny_algorithm(use_rng=True)
    return Trainer(algorithm, TaskBatches(task, seed=1), TrainerConfig(**settings),
                   optim or OptimConfig(lr=1e-2, warmup_steps=2, critic={"lr": 2e-2}), out, task=task)


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- resume
def test_resume_continues_the_uninterrupted_loss_trajectory(tmp_path, task):
    # the loss draws its noise from torch's global RNG, so this also needs the RNG states restored
    full = make_trainer(tmp_path / "full", task, checkpoint_every=4, keep_last=0, sample_every=3).fit()
    assert (tmp_path / "full/checkpoints/checkpoint-4").is_dir()

    # a fresh process-like start: new algorithm, the half-way checkpoint copied into a new run dir
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/checkpoint-4", tmp_path / "resumed/checkpoints/checkpoint-4")
    resumed = make_trainer(tmp_path / "resumed", task, resume="auto", checkpoint_every=4,
                           keep_last=0, sample_every=3).fit()

    assert resumed.start_step == 4 and [h["step"] for h in resumed.history] == list(range(8))
    tolerance = 1e-6  # on one CPU the runs are bitwise equal; the bound allows other BLAS builds
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["phase"] == b["phase"] and abs(a["loss"] - b["loss"]) <= tolerance, (a, b)
    for name in ("generator", "critic"):
        a, b = params(getattr(full.algorithm, name)), params(getattr(resumed.algorithm, name))
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=tolerance) for k in a)
    assert all(torch.allclose(x, y, rtol=0, atol=tolerance)
               for x, y in zip(full.ema.model.parameters(), resumed.ema.model.parameters(), strict=True))
    rows = [json.loads(line) for line in (tmp_path / "resumed/logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5, 6, 7]


# ---------------------------------------------------------------------------- checkpoints
def test_a_crash_during_save_leaves_the_previous_checkpoint_intact(tmp_path, task):
    out = tmp_path / "run"
    make_trainer(out, task, max_steps=6, checkpoint_every=2, keep_last=2).fit()
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # pruned to 2
    before = tree_digest(root)

    trainer = make_trainer(out, task, max_steps=8, checkpoint_every=2, keep_last=2, resume="auto")

    def crashing_save_state(output_dir, **_):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    trainer.accelerator.save_state = crashing_save_state
    with pytest.raises(OSError, match="disk full"):
        trainer.fit()
    assert tree_digest(root) == before  # nothing half-written, nothing pruned, nothing left over
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-6"]

    (root / ".tmp-checkpoint-9").mkdir()  # as if a process had died in the middle of a save
    result = make_trainer(out, task, max_steps=8, checkpoint_every=2, keep_last=2, resume="auto").fit()
    assert result.start_step == 6 and len(result.history) == 8
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-6", "checkpoint-8"]


# ---------------------------------------------------------------------------- phases
def test_only_the_running_phase_trains_and_the_teacher_never(tmp_path, task):
    trainer = make_trainer(tmp_path, task, algorithm=tiny_algorithm(), ema_decay=0.5)
    algorithm = trainer.algorithm
    seen = []
    loss = algorithm.loss

    def recording_loss(phase, batch, step):
        seen.append((phase, {name: {p.requires_grad for p in getattr(algorithm, name).parameters()}
                             for name in ("teacher", "generator", "critic")}))
        return loss(phase, batch, step)

    algorithm.loss = recording_loss
    teacher = params(algorithm.teacher)
    for step in range(4):
        before = {n: params(getattr(algorithm, n)) for n in ("generator", "critic")}
        ema_before = params(trainer.ema.model)
        record = trainer.train_step(step)
        phase, grads = seen[-1]
        other = "critic" if phase == "generator" else "generator"
        assert record.phase == phase == ("generator" if step % 2 else "critic")
        assert grads == {"teacher": {False}, phase: {True}, other: {False}}
        assert not same(before[phase], params(getattr(algorithm, phase)))
        assert same(before[other], params(getattr(algorithm, other)))
        assert same(ema_before, params(trainer.ema.model)) == (phase == "critic")
        assert all(p.grad is None for p in algorithm.parameters())
    assert same(teacher, params(algorithm.teacher))


def test_gradient_accumulation_matches_one_big_batch(tmp_path, task):
    # float64 and no RNG in the loss: two micro-batches of 8 give the gradient of one batch of 16
    results = [make_trainer(tmp_path / str(k), task, algorithm=tiny_algorithm(dtype=torch.float64), max_steps=4,
                            gradient_accumulation_steps=k).fit() for k in (1, 2)]
    for name in ("generator", "critic"):
        a, b = (params(getattr(r.algorithm, name)) for r in results)
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in a)
    assert not same(params(results[0].algorithm.critic), params(tiny_algorithm(dtype=torch.float64).critic))


def test_phase_optimizers_schedules_and_precision(tmp_path, task):
    optim = OptimConfig(lr=1e-3, betas=(0.0, 0.99), warmup_steps=4, max_grad_norm=0,
                        generator={"lr": 5e-4, "max_grad_norm": 2.0}, critic={"lr": None})
    trainer = make_trainer(tmp_path, task, algorithm=tiny_algorithm(), optim=optim, mixed_precision="auto")
    assert trainer.accelerator.mixed_precision == "no"  # auto on a CPU
    assert trainer.settings["generator"].max_grad_norm == 2.0 and trainer.settings["critic"].max_grad_norm is None
    lrs = {ph: opt.param_groups[0]["lr"] for ph, opt in trainer.optimizers.items()}
    assert lrs == pytest.approx({"critic": 1e-3 / 4, "generator": 5e-4 / 4})  # first warmup update
    assert trainer.optimizers["critic"].param_groups[0]["betas"] == (0.0, 0.99)
    records = [trainer.train_step(step) for step in range(6)]
    assert [r.lr for r in records if r.phase == "critic"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])
    with pytest.raises(StepdistillError, match="unknown key 'optim.critic.lrr'"):
        OptimConfig(critic={"lrr": 1.0})


# ---------------------------------------------------------------------------- non-finite guard
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, task):
    trainer = make_trainer(tmp_path, task, algorithm=tiny_algorithm(nan_steps=(1, 2)), max_steps=6,
                           max_nonfinite_in_a_row=3)
    generator = params(trainer.algorithm.generator)
    record = trainer.train_step(0)  # critic
    skipped = trainer.train_step(1)  # generator, NaN: no update, no optimizer state, zero grads
    assert skipped.skipped and math.isnan(skipped.loss) and not record.skipped
    assert same(generator, params(trainer.algorithm.generator)) and not trainer.optimizers["generator"].state
    assert all(p.grad is None for p in trainer.algorithm.parameters())

    result = make_trainer(tmp_path / "run", task, algorithm=tiny_algorithm(nan_steps=(1, 2)), max_steps=6,
                          max_nonfinite_in_a_row=3).fit()
    assert result.skipped_nonfinite == 2
    assert [math.isnan(h["loss"]) for h in result.history] == [False, True, True, False, False, False]
    rows = [json.loads(line) for line in (tmp_path / "run/logs.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows if r["skipped"]] == [(1, None), (2, None)]
    assert json.loads((tmp_path / "run/train.json").read_text())["skipped_nonfinite"] == 2


def test_max_wall_s_stops_like_max_steps(tmp_path, task, monkeypatch):
    """With trainer.max_wall_s the run ends at the first step past the deadline, as if max_steps were
    there: last checkpoint, student, train.json, the last step logged (a fake clock: 1 s per step)."""
    from types import SimpleNamespace

    from stepdistill.training import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = make_trainer(tmp_path, task, max_steps=50, max_wall_s=3.5, log_every=100)
    step_once = trainer.train_step

    def tick(step):
        clock[0] += 1.0
        return step_once(step)

    trainer.train_step = tick
    result = trainer.fit()
    assert len(result.history) == 4 and result.checkpoint.name == "checkpoint-4"
    assert json.loads((tmp_path / "train.json").read_text())["iterations"] == 4
    assert (tmp_path / "student").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "logs.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3  # logged as the last step (log_every=100 logs only first and last)
    with pytest.raises(StepdistillError, match="max_wall_s must be > 0"):
        TrainerConfig(max_wall_s=0)


def test_too_many_nonfinite_steps_in_a_row_stop_with_a_clear_message(tmp_path, task):
    trainer = make_trainer(tmp_path, task, algorithm=tiny_algorithm(nan_from=3), max_steps=20,
                           max_nonfinite_in_a_row=4, checkpoint_every=2)
    with pytest.raises(StepdistillError) as info:
        trainer.fit()
    message = str(info.value)
    assert "stopped at step 6: 4 steps in a row had a non-finite loss" in message
    assert "trainer.resume=auto" in message and len(message.splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-6"]


# ---------------------------------------------------------------------------- the train command
def run_cli(capsys, *args):
    code = main(["train", *[str(a) for a in args]])
    return code, capsys.readouterr()


BAD_INPUTS = {
    "unknown experiment": (["experiment=test/nope", SEARCHPATH], "unknown experiment 'test/nope'; allowed: "),
    "no experiment": ([], "choose an experiment: experiment=<dataset>/<name>; allowed: "),
    "misspelt key": (["experiment=test/tiny", SEARCHPATH, "trainer.max_stpes=3"],
                     "unknown config key 'trainer.max_stpes'"),
    "bad value": (["experiment=test/tiny", SEARCHPATH, "trainer.mixed_precision=fp7"],
                  "trainer.mixed_precision='fp7'; allowed: auto, no, bf16, fp16"),
    "optim for a missing phase": (["experiment=test/tiny", SEARCHPATH, "+optim.discriminator.lr=1"],
                                  "optim.discriminator overrides a phase this algorithm does not have"),
    "misspelt optim setting": (["experiment=test/tiny", SEARCHPATH, "+optim.lrr=1"],
                               "optim.lrr must be a mapping of per-phase overrides"),
    "bad phase setting": (["experiment=test/tiny", SEARCHPATH, "optim.critic.lr=fast"],
                          "optim.critic: could not convert string to float: 'fast'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line(case, tmp_path, capsys):
    args, message = BAD_INPUTS[case]
    code, captured = run_cli(capsys, *args, f"output_dir={tmp_path}/run")
    err = captured.err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    if case == "unknown experiment":
        assert "test/tiny" in err
    assert not (tmp_path / "run").exists()


def test_train_command_writes_a_run_and_guards_it(tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = run_cli(capsys, "experiment=test/tiny", SEARCHPATH, f"output_dir={out}")
    assert code == 0, captured.err
    config = (out / "config.yaml").read_text()
    assert "${" not in config and "max_steps: 6" in config and "TinyAlgorithm" in config
    assert "experiment_name: test/tiny" in config
    summary = json.loads((out / "train.json").read_text())
    assert summary["iterations"] == 6 and summary["skipped_nonfinite"] == 0 and summary["wall_s"] > 0
    assert summary["mixed_precision"] == "no" and summary["num_processes"] == 1
    rows = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(6))
    assert {"step", "phase", "loss", "lr", "grad_norm", "loss_x100"} <= set(rows[0])
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    student = load_denoiser(out / "student")
    assert student(torch.zeros(4, 2), 1.0, _labels(4)).shape == (4, 2)

    # an existing run is left alone without resume / overwrite: error, every byte unchanged
    before = tree_digest(out)
    code, captured = run_cli(capsys, "experiment=test/tiny", SEARCHPATH, f"output_dir={out}")
    assert code == 2 and "already holds a run" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert tree_digest(out) == before
    # a resume that fails (an incomplete checkpoint) also leaves it alone
    broken = tmp_path / "broken/checkpoint-6"
    shutil.copytree(out / "checkpoints/checkpoint-6", broken)
    (broken / "model_1.safetensors").unlink()
    code, captured = run_cli(capsys, "experiment=test/tiny", SEARCHPATH, f"output_dir={out}",
                             f"trainer.resume={broken}")
    assert code == 2 and "cannot resume from" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert tree_digest(out) == before

    code, captured = run_cli(capsys, "experiment=test/tiny", SEARCHPATH, f"output_dir={out}",
                             "trainer.resume=auto", "trainer.max_steps=9")
    assert code == 0, captured.err
    assert json.loads((out / "train.json").read_text())["start_step"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-9"]

    code, captured = run_cli(capsys, "experiment=test/tiny", SEARCHPATH, f"output_dir={out}", "overwrite=true",
                             "trainer.max_steps=2", "trainer.checkpoint_every=0")
    assert code == 0, captured.err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert json.loads((out / "train.json").read_text())["iterations"] == 2


def test_wandb_and_tensorboard_loggers_write_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    common = ["experiment=test/tiny", SEARCHPATH, "trainer.max_steps=2", "trainer.sample_every=0"]
    code, captured = run_cli(capsys, *common, "logger=wandb", f"output_dir={tmp_path}/wb")
    assert code == 0, captured.err
    runs = list((tmp_path / "wb/wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())

    code, captured = run_cli(capsys, *common, "logger=tensorboard", f"output_dir={tmp_path}/tb")
    assert code == 0, captured.err
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb/tensorboard").rglob("*"))


def _labels(n):
    from stepdistill.conditioning import Conditioning

    return Conditioning.labels(torch.zeros(n, dtype=torch.long), 4)


def test_untrained_algorithm_buffers_are_checkpointed_and_restored(tmp_path, task):
    """State the algorithm keeps outside its trained modules (f-distill's ratio normaliser) resumes."""
    algorithm = tiny_algorithm(use_rng=True)
    algorithm.tracker = torch.nn.Module()
    algorithm.tracker.register_buffer("running", torch.zeros(3, dtype=torch.float64))
    original_loss = algorithm.loss

    def counting_loss(phase, batch, step):
        algorithm.tracker.running += torch.tensor([1.0, step, phase == "critic"], dtype=torch.float64)
        return original_loss(phase, batch, step)

    algorithm.loss = counting_loss
    make_trainer(tmp_path / "run", task, algorithm=algorithm, max_steps=4, checkpoint_every=4).fit()
    assert algorithm.tracker.running.tolist() == [4.0, 6.0, 2.0]

    fresh = tiny_algorithm(use_rng=True)
    fresh.tracker = torch.nn.Module()
    fresh.tracker.register_buffer("running", torch.zeros(3, dtype=torch.float64))
    make_trainer(tmp_path / "run", task, algorithm=fresh, max_steps=4, resume="auto").fit()
    assert fresh.tracker.running.tolist() == [4.0, 6.0, 2.0]


def test_an_ema_target_network_resumes_with_the_run(tmp_path, task):
    """Consistency distillation's EMA target (frozen parameters the algorithm updates in
    ``after_step``) is checkpointed: a resumed run continues the same losses and target."""
    from stepdistill.algorithms.consistency import ConsistencyDistillation
    from stepdistill.roles import ConsistencyGenerator

    def build():
        roles = trainer_helpers.tiny_roles()
        generator = ConsistencyGenerator(roles["teacher"].denoiser, steps=2, solver_steps=8)
        return ConsistencyDistillation(roles["teacher"], generator, segments=[2, 1], stage_steps=[3],
                                       target_decay=0.5)

    optim = OptimConfig(lr=1e-2, warmup_steps=2)
    full = make_trainer(tmp_path / "full", task, algorithm=build(), optim=optim, checkpoint_every=4,
                        keep_last=0).fit()
    start = params(build().target)
    assert not same(start, params(full.algorithm.target))  # the target moved with the student
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/checkpoint-4", tmp_path / "resumed/checkpoints/checkpoint-4")
    resumed = make_trainer(tmp_path / "resumed", task, algorithm=build(), optim=optim, resume="auto",
                           checkpoint_every=4, keep_last=0).fit()
    assert resumed.start_step == 4
    for a, b in zip(full.history, resumed.history, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    a, b = params(full.algorithm.target), params(resumed.algorithm.target)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
