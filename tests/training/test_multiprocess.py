"""Two CPU processes (accelerate launch --multi_gpu, gloo) train exactly what one process trains
with the same global batch: each process takes its slice of the batch drawn for (seed, step), and
DDP's gradient average over equal slices equals the one-process mean.

Tolerance: the algorithm is float64 and draws no random numbers (its noise comes from the batch),
so the only difference is the order of floating-point sums (two per-slice means averaged by DDP,
against one mean over the whole batch). Over 12 AdamW steps at lr 1e-2 the observed gap is
<= 2.3e-16 in parameters and ~6e-17 in losses. We allow 1e-9: millions of times the rounding
noise, yet far below what a real difference makes (letting accelerate step the LR schedule once per
process, a doubled warmup, gives a 1e-2 gap; a wrong slice or an unsynchronised gradient, more).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.training.sharding import free_port

pytestmark = pytest.mark.slow  # a multi-minute training: `make test-fast` leaves it out

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "multiprocess_run.py"
TOLERANCE = 1e-9



def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(HERE.parent.parent), os.environ.get("PYTHONPATH", "")]))


def _run(args: list[str], out: Path, *script_args: str) -> dict:
    proc = subprocess.run(args + [str(SCRIPT), str(out), *script_args], capture_output=True, text=True,
                          env=_env(), timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=True)


def _launch_two() -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def _assert_same(one: dict, two: dict) -> None:
    assert [h["phase"] for h in one["history"]] == [h["phase"] for h in two["history"]]
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(one["history"], two["history"], strict=True)]
    assert max(gaps) <= TOLERANCE, gaps
    for name in ("generator", "critic", "ema"):
        a, b = one[name], two[name]
        gap = max((a[k] - b[k]).abs().max().item() for k in a)
        assert gap <= TOLERANCE, (name, gap)


def test_two_cpu_processes_train_what_one_process_trains(tmp_path):
    one = _run([sys.executable], tmp_path / "one")
    two = _run(_launch_two(), tmp_path / "two")
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert two["bucket_view"] is True  # trainer.gradient_as_bucket_view reached the trainer's DDP wrapper
    _assert_same(one, two)
    # two processes resumed from the half-way checkpoint (each its own RNG state) end the same way
    checkpoint = tmp_path / "two/run/checkpoints/checkpoint-6"
    resumed = _run(_launch_two(), tmp_path / "resumed", str(checkpoint))
    assert resumed["start_step"] == 6 and resumed["num_processes"] == 2
    _assert_same(one, resumed)
    # the run really trained (so equality is not two untouched copies)
    generator = [h["loss"] for h in one["history"] if h["phase"] == "generator"]
    assert generator[-1] < 0.8 * generator[0]


def _torchrun_two() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port())]


def test_two_processes_with_fsdp_shard_and_train_what_one_ddp_process_trains(tmp_path):
    """trainer.strategy=fsdp under torchrun (gloo, FSDP2 over two CPU processes): losses, weights (the
    critic and generator gathered whole, the EMA student), and every step's global gradient norm equal
    the one-process DDP run's; resuming from the sharded checkpoint under accelerate launch ends the
    same way."""
    one = _run([sys.executable], tmp_path / "one")
    two = _run(_torchrun_two(), tmp_path / "two", "none", "fsdp")
    assert two["num_processes"] == 2 and two["train"]["strategy"] == "fsdp"
    _assert_same(one, two)
    gaps = [abs(one["grad_norms"][s] - two["grad_norms"][s]) for s in one["grad_norms"]]
    assert len(gaps) == 12 and max(gaps) <= TOLERANCE, gaps
    gap = max((one["student"][k] - two["student"][k]).abs().max().item() for k in one["student"])
    assert gap <= TOLERANCE
    grid = "run/samples/step-000012.png"  # drawn through the sharded generator with the EMA swapped in
    assert (tmp_path / "two" / grid).read_bytes() == (tmp_path / "one" / grid).read_bytes()
    sharded = tmp_path / "two/run/checkpoints/checkpoint-6"
    assert sorted(p.name for p in (sharded / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    resumed = _run(_launch_two(), tmp_path / "resumed", str(sharded), "fsdp")  # accelerate launch this time
    assert resumed["start_step"] == 6
    _assert_same(one, resumed)
    # a sharded checkpoint resumes only sharded (one line, non-zero exit)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "ddp"), str(sharded)], capture_output=True,
                          text=True, env=_env(), timeout=240)
    assert proc.returncode != 0
    assert "a sharded checkpoint (trainer.strategy=fsdp|hsdp) resumes only with a sharded strategy" in proc.stderr



def test_hsdp_over_two_nodes_replicates_and_trains_what_one_process_trains(tmp_path):
    """trainer.strategy=hsdp launched as two nodes of one process each (two torchrun agents on this
    machine): the mesh is (2 nodes, 1 process per node), each node a replica; same results as one
    process."""
    one = _run([sys.executable], tmp_path / "one")
    port, out = str(free_port()), tmp_path / "hsdp"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port",
                               port, str(SCRIPT), str(out), "none", "hsdp"], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    two = torch.load(out / "result.pt", weights_only=True)
    assert (two["train"]["strategy"], two["train"]["mesh"], two["num_processes"]) == ("hsdp", [2, 1], 2)
    _assert_same(one, two)
    assert max(abs(one["grad_norms"][s] - two["grad_norms"][s]) for s in one["grad_norms"]) <= TOLERANCE
