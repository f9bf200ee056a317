"""AGD on the tiny SD1.5 stack (issue 6): adapters after every cross-attention, a few percent of the
UNet; trajectories over the shapes prompts (data-free, text conditions and the empty-prompt null
stored with them); the run trains, loads back and samples through the pipeline with one UNet forward
per step, and its adapters export with `format=adapters`.

Measured with tiny_sd/agd: 4 cross-attention adapters, 12,096 adapter parameters, 1.53% of the
UNet's 792,964.
"""

import json

import pytest
import torch

from stepdistill.adapters import parameter_count
from stepdistill.cli import main
from stepdistill.config import compose
from stepdistill.pipelines.few_step import FewStepPipeline
from stepdistill.workflows.train import build_algorithm


def test_adapters_sit_after_every_cross_attention_and_are_a_few_percent(one_thread):
    algo = build_algorithm(compose("train", ["experiment=tiny_sd/agd", "output_dir=x"]), seed=0)
    targets = algo.generator.adapters.settings["targets"]
    assert len(targets) == 4 and all(t.endswith("attn2") for t in targets)
    share = parameter_count(algo.generator.adapters) / parameter_count(algo.teacher.denoiser)
    assert (parameter_count(algo.generator.adapters), parameter_count(algo.teacher.denoiser)) == (12_096, 792_964)
    assert share == pytest.approx(0.0153, abs=5e-4)
    algo.generator.adapters.detach()


def test_tiny_sd_agd_trains_samples_and_exports(tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    assert main(["train", "experiment=tiny_sd/agd", f"output_dir={run}", "trainer.progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "guidance adapters: 12,096 trainable parameters, 1.53% of the frozen base's 792,964" in printed
    assert "0 of 2 shards present, 0.0 MiB on disk" in printed and "2 shards, 0.2 MiB on disk" in printed
    assert json.loads((run / "train.json").read_text())["iterations"] == 20
    manifest = json.loads((run / "trajectories" / "manifest.json").read_text())
    assert (manifest["w_min"], manifest["w_max"], manifest["steps"]) == (1.0, 12.0, 10)

    pipe = FewStepPipeline.from_run(run)
    calls = []
    handle = pipe.backbone.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    guided = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="latent").images
    handle.remove()
    assert calls == [1, 1, 1, 1]  # one UNet forward of the one sample per step (CFG: a batch of 2)
    with pipe.student().adapters.disabled():
        plain = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                     output_type="latent").images
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    assert main(["export", f"run={run}", "format=adapters", f"out={tmp_path / 'out'}"]) == 0
    assert (tmp_path / "out" / "adapters.safetensors").is_file()
