"""``stepdistill bench overhead``: the bare loop is a faithful floor (same updates as the trainer), and
the suite writes its JSON / markdown / plot with ratio = trainer / bare."""

import json

import pytest
import torch

from stepdistill.bench import overhead
from stepdistill.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    return overhead._build("toy2d/dmd2", tmp_path_factory.mktemp("overhead"))


def _generator_params(algorithm):
    return torch.cat([p.detach().flatten() for p in algorithm.generator.parameters()])


def test_bare_loop_makes_the_trainers_updates(built):
    """From the same RNG state, 6 steps (critic and generator phases, clipping, EMA) of the bare loop
    and of the trainer leave the same generator, critic and EMA weights."""
    trainer, callbacks, bare = built
    phases = {trainer.algorithm.phase(s) for s in range(6)}
    assert phases == {"generator", "critic"}
    assert torch.equal(_generator_params(trainer.algorithm), _generator_params(bare.algorithm))
    torch.manual_seed(3)
    for step in range(6):
        trainer.run_step(step, callbacks)
    torch.manual_seed(3)
    for step in range(6):
        bare(step)
    before = _generator_params(trainer.algorithm)
    assert not torch.equal(before, torch.cat([p.detach().flatten() for p in trainer.ema.model.parameters()]))
    torch.testing.assert_close(_generator_params(bare.algorithm), before, rtol=1e-5, atol=1e-6)
    for a, b in zip(trainer.algorithm.critic.parameters(), bare.algorithm.critic.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(trainer.ema.model.parameters(), bare.ema.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_suite_writes_ratio_of_medians(tmp_path, one_thread):
    out = tmp_path / "bench"
    payload = overhead.run([f"output_dir={out}", "dataset=toy2d", "experiments=[toy2d/lcm]", "blocks=2",
                            "block_s=0.05", "min_iterations=2"])
    data = json.loads((out / "bench_overhead.json").read_text())
    row = data["lcm"]
    assert row == payload["lcm"]
    assert row["trainer_s_per_it"] > 0 and row["bare_s_per_it"] > 0
    assert row["ratio"] == row["trainer_s_per_it"] / row["bare_s_per_it"]
    assert len(row["trainer_blocks_s_per_it"]) == len(row["bare_blocks_s_per_it"]) == 2
    assert data["machine"]["date"] and (out / "bench_overhead.png").stat().st_size > 0
    assert "| lcm | toy2d/lcm |" in (out / "bench_overhead.md").read_text()


def test_bad_input_is_one_line(tmp_path, capsys):
    assert main(["bench", "overhead", f"output_dir={tmp_path}", "blokcs=3"]) == 2
    assert main(["bench", "overhead", f"output_dir={tmp_path}", "dataset=cifar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown key 'blokcs'" in err[0] and "unknown dataset 'cifar'" in err[1]
    assert not any(tmp_path.iterdir())
