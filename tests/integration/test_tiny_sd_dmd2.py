"""Text-to-image DMD2 from prompts alone: the tiny_sd/dmd2 experiment trains, samples and exports,
and the prompt task's batches are the teacher pipeline's prompt embeddings, the same on every process."""

import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.data.prompts import PromptData, PromptEncoder
from stepdistill.errors import StepdistillError
from stepdistill.eval.tasks import PromptTask
from stepdistill.tiny_stacks import tiny_stack_dir
from stepdistill.training.trainer import TaskBatches


@pytest.fixture(scope="module")
def sd15_teacher(one_thread):
    return tiny_stack_dir("sd15")


def test_tiny_stack_dir_is_built_once_and_reused(sd15_teacher):
    stamp = (sd15_teacher / "unet" / "config.json").stat().st_mtime_ns
    assert tiny_stack_dir("sd15") == sd15_teacher
    assert (sd15_teacher / "unet" / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(StepdistillError, match="unknown tiny stack 'sd2'; allowed: sd15, sdxl, sd3"):
        tiny_stack_dir("sd2")


def test_prompt_batches_are_the_pipeline_embeddings_and_deterministic(sd15_teacher):
    data = PromptData(prompts=["a red circle", "a blue square", "the big star"])
    task = PromptTask(data, str(sd15_teacher))
    batches = TaskBatches(task, seed=3)
    first, again, other = batches(5, 4), batches(5, 4), batches(6, 4)
    assert first.x0 is None and first.cond.prompt_embeds.shape == (4, 16, 32)
    assert torch.equal(first.cond.prompt_embeds, again.cond.prompt_embeds)  # same step: same global batch
    assert not torch.equal(first.cond.prompt_embeds, other.cond.prompt_embeds)
    drawn = data.draw(4, torch.Generator().manual_seed(3 * 1_000_033 + 7919 * 5 + 1))
    expected = PromptEncoder.from_pretrained(sd15_teacher).encode(drawn)
    assert torch.equal(first.cond.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(first.cond.null_prompt_embeds, expected.null_prompt_embeds)


def test_prompt_data_errors(tmp_path):
    with pytest.raises(StepdistillError, match="exactly one of data.file"):
        PromptData()
    with pytest.raises(StepdistillError, match="prompt file not found"):
        PromptData(file=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(StepdistillError, match="prompt list is empty"):
        PromptData(file=str(tmp_path / "empty.txt"))
    (tmp_path / "p.txt").write_text("a red circle\n\n# skip\n the big star \n")
    assert PromptData(file=str(tmp_path / "p.txt")).prompts == ["a red circle", "the big star"]


def test_tiny_sd_dmd2_trains_samples_and_exports(sd15_teacher, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "experiment=tiny_sd/dmd2", f"output_dir={run}", "trainer.max_steps=12",
                 "trainer.batch_size=4", "trainer.checkpoint_every=0", "trainer.progress=false"]) == 0
    logs = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in logs} == {"critic", "generator"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert json.loads((run / "train.json").read_text())["iterations"] == 12
    assert main(["sample", f"run={run}", "prompt=a red circle", "num_images=2", f"out={tmp_path / 's'}"]) == 0
    assert (tmp_path / "s" / "grid.png").stat().st_size > 0
    assert main(["export", f"run={run}", "format=diffusers", f"out={tmp_path / 'e'}"]) == 0
    index = json.loads((tmp_path / "e" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "LCMScheduler"


@pytest.mark.parametrize("args,message", [
    (["experiment=sd15/dmd2", "data.file=x.txt"], "teacher.path is required"),
    (["experiment=tiny_sd/dmd2", "evaluate.enabled=true"], "'prompts' task has no metrics of its own"),
    (["experiment=tiny_sd/dmd2", "data.file=/no/such/prompts.txt"], "prompt file not found"),
])
def test_bad_text_runs_are_one_line_errors_and_write_nothing(args, message, tmp_path, capsys, sd15_teacher):
    assert main(["train", *args, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
