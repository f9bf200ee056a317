"""``optim.name=adamw8bit``: torchao's 8-bit AdamW (the ``8bit`` extra). Its state takes ~4x fewer
bytes than AdamW's (measured), it follows AdamW's trajectory on a small regression, its state
round-trips through the trainer's checkpoints (``accelerator.save_state`` / ``load_state``), and a
missing extra or an unknown name is a one-line error.

torchao compiles its update once per parameter shape (``torch.compile``); a cold compile cache costs
about a minute on 2 CPU cores, so these tests run it eagerly (``torch.compiler.set_stance
("force_eager")``: the same update maths on the same 8-bit state tensors, unfused). The compiled
update was checked by hand on this CPU (torch 2.13, torchao 0.18): the same bytes, a trajectory within
the same tolerances, and the same exact resume."""

import io
import shutil
import sys

import pytest
import torch
from torch import nn
from trainer_helpers import TinyAlgorithm, tiny_roles

from stepdistill.cli import main
from stepdistill.data.toy2d import ToyMixture
from stepdistill.errors import StepdistillError
from stepdistill.eval.tasks import Toy2DTask
from stepdistill.training.optim import (
    OptimConfig,
    PhaseOptim,
    adamw8bit_class,
    build_optimizer,
    build_schedule,
)
from stepdistill.training.settings import TrainerConfig
from stepdistill.training.trainer import TaskBatches, Trainer


@pytest.fixture(autouse=True)
def _fresh_accelerate(one_thread):
    with torch.compiler.set_stance("force_eager"):
        yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's ``OptimState8bit``: uint8 codes, one fp32
    scale per block of 256, a 256-entry fp32 code table) counts its inner tensors."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _moment_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(_bytes(opt.state[p][k]) for k in ("exp_avg", "exp_avg_sq"))


def _stepped(name: str, shape: tuple[int, ...]) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    p = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    opt = build_optimizer([p], PhaseOptim(lr=1e-3, name=name))
    p.grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    opt.step()
    return opt, p


def test_8bit_state_takes_a_quarter_of_adamws_bytes():
    (adamw, p), (eight, q) = _stepped("adamw", (512, 512)), _stepped("adamw8bit", (512, 512))
    assert type(eight.state[q]["exp_avg"]).__name__ == "OptimState8bit"
    assert _moment_bytes(adamw, p) == 2_097_152  # 2 moments x 262,144 values x 4 bytes
    assert _moment_bytes(eight, q) == 534_528  # 2 x (262,144 codes + 1,024 scales x 4 + 256 x 4)
    assert _moment_bytes(adamw, p) / _moment_bytes(eight, q) > 3.9
    saved = {}
    for name, opt in (("adamw", adamw), ("adamw8bit", eight)):
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        saved[name] = buffer.tell()
    assert saved["adamw"] / saved["adamw8bit"] > 3.5  # the checkpoint's optimizer file (pickling overhead included)
    # tensors under 4096 values keep fp32 moments (torchao follows bitsandbytes' threshold)
    (small_adamw, s), (small_eight, r) = _stepped("adamw", (64,)), _stepped("adamw8bit", (64,))
    assert type(small_eight.state[r]["exp_avg"]) is torch.Tensor
    assert _moment_bytes(small_eight, r) == _moment_bytes(small_adamw, s) == 512


def _regression(name: str, steps: int = 40) -> tuple[list[float], nn.Module]:
    """A 64 -> 64 -> 2 MLP fitting a fixed random MLP's outputs, AdamW(-8bit) with a warmup."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    with torch.no_grad():
        target = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))(x)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    settings = PhaseOptim(lr=1e-2, warmup_steps=5, name=name)
    opt = build_optimizer(list(model.parameters()), settings)
    schedule = build_schedule(opt, settings)
    losses = []
    for _ in range(steps):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return losses, model


def test_8bit_adamw_follows_adamws_trajectory():
    (exact, model), (eight, model8) = _regression("adamw"), _regression("adamw8bit")
    # measured: loss 0.140 -> 0.00118 with either; largest relative loss gap 1.1%, weights within 3.3%
    assert eight[0] == exact[0] and exact[-1] < 0.05 * exact[0] and eight[-1] < 0.05 * eight[0]
    assert max(abs(a - b) / a for a, b in zip(exact, eight, strict=True)) < 0.03
    for p, q in zip(model.parameters(), model8.parameters(), strict=True):
        assert float((q - p).detach().norm() / p.detach().norm()) < 0.06


def _trainer(out, task, **config) -> Trainer:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    settings = dict(max_steps=8, batch_size=16, checkpoint_every=4, keep_last=0, sample_every=0, num_samples=64,
                    ema_decay=None, progress=False, cpu=True, log_every=1)
    algorithm = TinyAlgorithm(**tiny_roles(hidden=64), use_rng=True)  # 64 x 64 weights: 8-bit moments
    return Trainer(algorithm, TaskBatches(task, seed=1), TrainerConfig(**{**settings, **config}),
                   OptimConfig(name="adamw8bit", lr=1e-2, warmup_steps=2), out, task=task)


def test_8bit_state_round_trips_through_the_trainers_checkpoint(tmp_path):
    from accelerate.utils.other import load  # what accelerator.load_state reads optimizer.bin with

    task = Toy2DTask(ToyMixture(modes=3, classes=3, radius=2.0, std=0.15), num_eval=64)
    full = _trainer(tmp_path / "full", task).fit()
    saved = load(tmp_path / "full/checkpoints/checkpoint-4/optimizer.bin", map_location="cpu")  # weights_only
    assert "OptimState8bit" in {type(s["exp_avg"]).__name__ for s in saved["state"].values()}
    (tmp_path / "resumed/checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full/checkpoints/checkpoint-4", tmp_path / "resumed/checkpoints/checkpoint-4")
    resumed = _trainer(tmp_path / "resumed", task, resume="auto").fit()
    assert resumed.start_step == 4
    tolerance = 1e-6  # bitwise equal on one CPU; the bound allows other BLAS builds
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["phase"] == b["phase"] and abs(a["loss"] - b["loss"]) <= tolerance, (a, b)
    for name in ("generator", "critic"):
        for p, q in zip(getattr(full.algorithm, name).parameters(), getattr(resumed.algorithm, name).parameters(),
                        strict=True):
            assert torch.allclose(p, q, rtol=0, atol=tolerance)


def test_missing_extra_is_a_one_line_error_naming_the_install(monkeypatch, tmp_path, capsys):
    for module in ("torchao", "torchao.optim"):  # as if torchao were not installed
        monkeypatch.setitem(sys.modules, module, None)
    for build in (lambda: OptimConfig(name="adamw8bit"), lambda: OptimConfig(critic={"name": "adamw8bit"}),
                  adamw8bit_class):
        with pytest.raises(StepdistillError) as error:
            build()
        assert "pip install 'stepdistill[8bit]'" in str(error.value) and "\n" not in str(error.value)
    assert main(["train", "experiment=toy2d/dmd2", f"output_dir={tmp_path / 'run'}", "optim.name=adamw8bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'stepdistill[8bit]'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_unknown_optimizer_is_a_one_line_error_listing_the_allowed(tmp_path, capsys):
    with pytest.raises(StepdistillError, match=r"optim.name='sgd' is not an optimizer; allowed: adamw, adamw8bit$"):
        OptimConfig(name="sgd")
    with pytest.raises(StepdistillError, match=r"optim.critic.name='lion' .* allowed: adamw, adamw8bit$"):
        OptimConfig(critic={"name": "lion"})
    config = OptimConfig(critic={"name": "adamw8bit"})  # per phase: the critic alone in 8 bits
    assert config.for_phase("critic").name == "adamw8bit" and config.for_phase("generator").name == "adamw"
    assert main(["train", "experiment=toy2d/dmd2", f"output_dir={tmp_path / 'run'}", "optim.name=sgd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "allowed: adamw, adamw8bit" in err and len(err.splitlines()) == 1, err
