"""Cached conditioning (``stepdistill cache`` + ``data.cache``): the cache holds exactly what the prompt
task encodes, training with it draws the same batches and gives the same losses without ever building
a text encoder (or, for images, the VAE), it resumes shard by shard, a stale cache is a one-line error,
and on the tiny SD3 stack it removes the CLIP + CLIP + T5 encoders from the training process."""

import json
import os
import re
import shutil
import subprocess
import sys

import diffusers
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.commands import train
from stepdistill.config import ASSETS_DIR
from stepdistill.data.images import ImageCaptionData
from stepdistill.data.prompts import PromptData, PromptEncoder
from stepdistill.data.text_cache import ConditioningCache, shard_path
from stepdistill.errors import StepdistillError
from stepdistill.eval.tasks import PromptTask
from stepdistill.tiny_stacks import tiny_stack_dir
from stepdistill.training.trainer import TaskBatches

PROMPTS = ASSETS_DIR / "prompts" / "shapes.txt"
SHAPES = ASSETS_DIR / "shapes_images"
ENCODERS = (transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection, transformers.T5EncoderModel)
QUIET = ["progress=false"]
BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _draw_generator(seed: int, step: int) -> torch.Generator:
    """The generator ``TaskBatches`` draws step ``step``'s global batch with."""
    return torch.Generator().manual_seed(seed * 1_000_033 + 7919 * step + 1)


@pytest.fixture
def no_encoders(monkeypatch):
    """Building (or loading) a text encoder or a VAE from here on fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder / VAE was built although the cache holds its outputs")

    for cls in (*ENCODERS, diffusers.AutoencoderKL):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr(PromptEncoder, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def sd15_cache(one_thread, tmp_path_factory):
    """The tiny_sd/dmd2 prompts cached in 3 shards (3 + 3 + 2 rows)."""
    out = tmp_path_factory.mktemp("cache") / "sd15"
    assert main(["cache", "experiment=tiny_sd/dmd2", f"out={out}", "shard_size=3", "batch_size=2", *QUIET]) == 0
    return out


def test_cache_holds_the_task_embeddings_in_order(sd15_cache):
    index = json.loads((sd15_cache / "index.json").read_text())
    prompts = PromptData(file=str(PROMPTS)).prompts
    assert index["prompts"] == prompts and index["num_rows"] == 8 and index["dtype"] == "fp32"
    assert index["teacher"] == str(tiny_stack_dir("sd15").resolve()) and len(index["encoder_hash"]) == 16
    assert [p.name for p in sorted(sd15_cache.glob("*.safetensors"))] == [
        "null.safetensors", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    stored = torch.cat([load_file(shard_path(sd15_cache, s))["prompt_embeds"] for s in range(3)])
    expected = PromptEncoder.from_pretrained(tiny_stack_dir("sd15")).encode(prompts)
    assert stored.shape == (8, 16, 32) and torch.equal(stored, expected.prompt_embeds)
    assert torch.equal(load_file(sd15_cache / "null.safetensors")["null_prompt_embeds"], expected.null_prompt_embeds)


def test_cached_task_draws_the_same_rows_and_batches_without_text_encoders(sd15_cache, request):
    teacher = str(tiny_stack_dir("sd15"))
    plain = TaskBatches(PromptTask(PromptData(file=str(PROMPTS)), teacher), seed=3)
    request.getfixturevalue("no_encoders")
    task = PromptTask(PromptData(file=str(PROMPTS), cache=str(sd15_cache)), teacher)
    cached = TaskBatches(task, seed=3)
    cache = ConditioningCache(sd15_cache)
    for step in range(4):
        rows = torch.randint(8, (4,), generator=_draw_generator(3, step)).tolist()
        assert [task.encoder.rows[p] for p in task.data.draw(4, _draw_generator(3, step))] == rows
        batch, expected = cached(step, 4), plain(step, 4)
        assert torch.equal(batch.cond.prompt_embeds, cache.read("prompt_embeds", rows))
        assert torch.equal(batch.cond.prompt_embeds, expected.cond.prompt_embeds)
        assert torch.equal(batch.cond.null_prompt_embeds, expected.cond.null_prompt_embeds)
        share = cached(step, 4, slice(2, 4))  # a process's share of the global batch
        assert torch.equal(share.cond.prompt_embeds, expected.cond.prompt_embeds[2:4])
    with pytest.raises(StepdistillError, match="'a purple ring' is not in the cache"):
        task.encoder.encode(["a purple ring"])


def test_training_with_the_cache_gives_the_same_losses(sd15_cache, tmp_path, request):
    args = ["experiment=tiny_sd/dmd2", "trainer.max_steps=4", "trainer.batch_size=2", "trainer.checkpoint_every=0",
            "trainer.progress=false", "algorithm.critic_updates_per_generator_update=1"]
    plain = train.run([*args, f"output_dir={tmp_path / 'plain'}"])
    request.getfixturevalue("no_encoders")
    cached = train.run([*args, f"output_dir={tmp_path / 'cached'}", f"data.cache={sd15_cache}"])
    assert [r["phase"] for r in plain.history] == ["critic", "generator", "critic", "generator"]
    assert [r["loss"] for r in cached.history] == [r["loss"] for r in plain.history]


def test_rerun_keeps_whole_shards_and_redoes_missing_and_half_written_ones(sd15_cache, tmp_path, request):
    out = tmp_path / "cache"
    shutil.copytree(sd15_cache, out)
    original = {s: {k: v.clone() for k, v in load_file(shard_path(out, s)).items()} for s in range(3)}  # not mmapped
    cut = shard_path(out, 2).read_bytes()
    kept = shard_path(out, 0).stat().st_mtime_ns
    shard_path(out, 1).unlink()
    shard_path(out, 2).write_bytes(cut[: len(cut) // 2])  # cut short
    (out / ".shard-00002.safetensors.tmp-123").write_bytes(b"partial")
    assert main(["cache", "experiment=tiny_sd/dmd2", f"out={out}", "batch_size=2", *QUIET]) == 0
    assert shard_path(out, 0).stat().st_mtime_ns == kept
    for s in range(3):  # the same tensors (the header's key order is the writer's own)
        redone = load_file(shard_path(out, s))
        assert redone.keys() == original[s].keys() and all(torch.equal(redone[k], original[s][k]) for k in redone)
    assert not list(out.glob(".*tmp*"))
    request.getfixturevalue("no_encoders")  # complete: nothing is loaded
    from stepdistill.commands import cache

    assert cache.run(["experiment=tiny_sd/dmd2", f"out={out}", *QUIET])["written"] == 0


@pytest.mark.parametrize("args,message", [
    (["cache", "experiment=tiny_sd/dmd2", "data.prompts=[a red circle]", "data.file=null"],
     "holds a cache of other rows_hash/num_rows .* pass overwrite=true"),
    (["cache", "experiment=tiny_sd/dmd2", "shard_size=2"], "holds a cache in shards of 3 rows"),
    (["cache", "experiment=tiny_sd/dmd2", "dtype=fp8"], "dtype='fp8'; allowed: fp32, bf16, fp16"),
    (["cache", "experiment=digits/dmd2"], "`stepdistill cache` encodes prompts: DigitsData has none"),
    (["cache", "teacher.path=/x"], "choose the data to cache"),
    (["train", "experiment=tiny_sd/dmd2", "data.prompts=[a red circle]", "data.file=null"],
     "data.prompts changed since the cache .* re-run `stepdistill cache`"),
    (["train", "experiment=tiny_sd/dmd2", "teacher.path=${tiny_stack:sdxl}"],
     "made with the text encoders of .*sd15.*, not those of .*sdxl.*: re-run `stepdistill cache`"),
    (["train", "experiment=tiny_sd/dmd2", "task.negative_prompt=blurry"],
     "holds the null condition of negative_prompt='', not 'blurry': re-run `stepdistill cache`"),
])
def test_stale_or_wrong_caches_are_one_line_errors(args, message, sd15_cache, tmp_path, capsys):
    out = tmp_path / "cache"
    shutil.copytree(sd15_cache, out)
    where = ([f"out={out}", *QUIET] if args[0] == "cache"
             else [f"data.cache={out}", f"output_dir={tmp_path / 'run'}", "trainer.progress=false"])
    assert main([*args, *where]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_incomplete_cache_is_a_one_line_error(sd15_cache, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(sd15_cache, out)
    shard_path(out, 2).unlink()
    with pytest.raises(StepdistillError, match=r"incomplete \(1 of 3 shards missing\): re-run the same "):
        PromptData(file=str(PROMPTS), cache=str(out))


def test_image_cache_holds_the_vae_latents_and_no_vae_is_loaded(tmp_path, request, one_thread):
    out = tmp_path / "images"
    assert main(["cache", "experiment=tiny_sd/fdistill", f"out={out}", "batch_size=8", *QUIET]) == 0
    assert json.loads((out / "index.json").read_text())["tensors"]["latents"] == [4, 8, 8]
    teacher = str(tiny_stack_dir("sd15"))
    plain = TaskBatches(PromptTask(ImageCaptionData(str(SHAPES), resolution=16), teacher), seed=2)
    expected = plain(4, 6)
    request.getfixturevalue("no_encoders")
    cached = TaskBatches(PromptTask(ImageCaptionData(str(SHAPES), resolution=16, cache=str(out)), teacher), seed=2)
    batch = cached(4, 6)
    torch.testing.assert_close(batch.x0, expected.x0, rtol=0, atol=1e-6)
    assert torch.equal(batch.cond.prompt_embeds, expected.cond.prompt_embeds)


@pytest.mark.slow
def test_sd3_cache_removes_the_t5_and_clip_encoders_from_training(tmp_path, request, one_thread):
    teacher = tiny_stack_dir("sd3")
    out = tmp_path / "sd3"
    assert main(["cache", "data=prompts", f"data.file={PROMPTS}", f"teacher.path={teacher}", f"out={out}",
                 "task.negative_prompt=a line", *QUIET]) == 0
    plain_task = PromptTask(PromptData(file=str(PROMPTS)), str(teacher), negative_prompt="a line")
    expected = TaskBatches(plain_task, seed=1)(2, 5)
    loaded = sum(p.numel() * p.element_size() for p in plain_task.encoder.parameters())
    on_disk = 0  # every text encoder tensor, counted from the checkpoints' headers
    for file in teacher.glob("text_encoder*/*.safetensors"):
        with safe_open(str(file), "pt") as f:
            on_disk += sum(torch.Size(f.get_slice(k).get_shape()).numel() * BYTES[f.get_slice(k).get_dtype()]
                           for k in f.keys())
    assert len(list(teacher.glob("text_encoder*/*.safetensors"))) == 3 and loaded == on_disk
    request.getfixturevalue("no_encoders")
    cached_task = PromptTask(PromptData(file=str(PROMPTS), cache=str(out)), str(teacher), negative_prompt="a line")
    batch = TaskBatches(cached_task, seed=1)(2, 5)
    assert not isinstance(cached_task.encoder, torch.nn.Module)  # nothing with parameters is held
    assert batch.cond.prompt_embeds.shape == (5, 16 + 256, 64)  # CLIP tokens then T5's 256
    for name in ("prompt_embeds", "pooled_embeds", "null_prompt_embeds", "null_pooled_embeds"):
        assert torch.equal(getattr(batch.cond, name), getattr(expected.cond, name)), name
    plain_rss, cached_rss = _task_peak_rss(teacher, None), _task_peak_rss(teacher, out)
    assert plain_rss - cached_rss >= loaded
    print(f"tiny SD3 task: text encoder parameters {loaded:,} bytes; peak RSS of building it and drawing a "
          f"batch {plain_rss / 2**20:.1f} MiB -> {cached_rss / 2**20:.1f} MiB with the cache")


def _task_peak_rss(teacher, cache) -> int:
    """Peak RSS growth (bytes, Linux) of a fresh process building the SD3 prompt task and drawing a batch."""
    code = f"""
import re, torch
torch.set_num_threads(1)
from stepdistill.data.prompts import PromptData
from stepdistill.eval.tasks import PromptTask
from stepdistill.training.trainer import TaskBatches
def peak():  # VmHWM: this process's own peak (ru_maxrss would start at the forking parent's RSS)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
before = peak()
task = PromptTask(PromptData(file={str(PROMPTS)!r}, cache={None if cache is None else str(cache)!r}),
                  {str(teacher)!r}, negative_prompt="a line")
TaskBatches(task, 0)(0, 8)
print(peak() - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(result.stdout.strip().splitlines()[-1])


def test_sdxl_cache_keeps_time_ids_and_the_zero_null_condition(tmp_path, request, one_thread):
    teacher = tiny_stack_dir("sdxl")
    out = tmp_path / "sdxl"
    assert main(["cache", "experiment=tiny_sd/dmd2", f"teacher.path={teacher}", f"out={out}", *QUIET]) == 0
    expected = TaskBatches(PromptTask(PromptData(file=str(PROMPTS)), str(teacher)), seed=5)(3, 6).cond
    request.getfixturevalue("no_encoders")
    cond = TaskBatches(PromptTask(PromptData(file=str(PROMPTS), cache=str(out)), str(teacher)), seed=5)(3, 6).cond
    assert cond.time_ids.shape == (6, 6) and not cond.null_prompt_embeds.any()  # force_zeros_for_empty_prompt
    for name in ("prompt_embeds", "pooled_embeds", "time_ids", "null_prompt_embeds", "null_pooled_embeds"):
        assert torch.equal(getattr(cond, name), getattr(expected, name)), name
