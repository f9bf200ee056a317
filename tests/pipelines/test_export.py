"""export_diffusers: a fresh Python process that never imports stepdistill reproduces our K-step samples.

One subprocess (diffusers' import costs seconds) checks every export: SD1.5-like (through the CLI, from
a run directory), SD1.5-like with v-prediction, SDXL-like, and a class-conditional UNet2DModel.
Tolerances: decoded images (in [0, 1]) within ``IMAGE_ATOL``; latents / pixels within ``RAW_RTOL`` of
their largest magnitude (x0 at t = 999 divides by sqrt(abar) ~ 0.07, so tiny random students give
latents ~ 1e2; float32 vs our float64 conversion differ by ~1e-7 relative).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from pipeline_helpers import NUM_CLASSES, STEPS, make_run, perturbed

from stepdistill.cli import main
from stepdistill.denoisers.loading import load_denoiser
from stepdistill.errors import StepdistillError
from stepdistill.lora import lora_named_parameters
from stepdistill.pipelines import (
    FewStepPipeline,
    export_diffusers,
    few_step_scheduler,
    lcm_timesteps,
)
from stepdistill.pipelines.scheduler import generator_timesteps, lcm_original_steps
from stepdistill.pipelines.staging import MARKER
from stepdistill.roles import ConsistencyGenerator, Generator, Teacher

IMAGE_ATOL = 1e-4
RAW_RTOL = 1e-5
PROMPTS = ["a red circle", "the big blue star on a line"]
LABELS = [0, 1, 2, 2, 1]
SEED = 123
OWN_GRID = [300, 150, 100, 50]

FRESH = r"""
import json, math, sys
import torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline, LCMScheduler, UNet2DModel
loaded = lambda: sorted(m for m in sys.modules if m == "stepdistill" or m.startswith("stepdistill."))
assert not loaded(), loaded()
root = sys.argv[1]
refs = torch.load(f"{root}/refs.pt", weights_only=True)
spec = json.loads(open(f"{root}/spec.json").read())
out = {}

def diff(a, b):
    return [float((a - b).abs().max()), float(b.abs().max())]

for name, case in spec["text"].items():
    pipe = DiffusionPipeline.from_pretrained(case["dir"])
    pipe.set_progress_bar_config(disable=True)
    out[name + "/pipeline"] = [type(pipe).__name__, type(pipe.scheduler).__name__]
    for k, timesteps in case["runs"]:
        extra = {"timesteps": timesteps} if timesteps else {"num_inference_steps": k}
        key = f"{name}/{k}" + ("/timesteps" if timesteps else "")
        for kind in ("latent", "pt"):
            got = pipe(spec["prompts"], guidance_scale=case.get("guidance_scale", 1.0),
                       generator=torch.Generator().manual_seed(spec["seed"]), output_type=kind, **extra).images
            out[f"{key}/{kind}"] = diff(got, refs[f"{name}/{k}/{kind}"])

for name, case in spec["lora"].items():  # the documented LoRA loading: base pipeline + LCMScheduler + adapters
    pipe = DiffusionPipeline.from_pretrained(case["base"])
    pipe.scheduler = LCMScheduler.from_pretrained(case["dir"], subfolder="scheduler")
    pipe.load_lora_weights(case["dir"])
    pipe.set_progress_bar_config(disable=True)
    out[name + "/pipeline"] = [type(pipe).__name__, type(pipe.scheduler).__name__]
    for k in case["steps"]:
        for kind in ("latent", "pt"):
            got = pipe(spec["prompts"], num_inference_steps=k, guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(spec["seed"]), output_type=kind).images
            out[f"{name}/{k}/{kind}"] = diff(got, refs[f"{name}/{k}/{kind}"])

for name, case in spec["class"].items():
    unet = UNet2DModel.from_pretrained(case["dir"] + "/unet")
    scheduler = LCMScheduler.from_pretrained(case["dir"] + "/scheduler")
    labels = torch.tensor(spec["labels"])
    shape = (len(labels), unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    with torch.no_grad():
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(spec["seed"]))
        # the documented one-step rule: T0 = round(t_max (N - 1))
        T = round(case["t_max"] * (scheduler.config.num_train_timesteps - 1))
        abar = scheduler.alphas_cumprod[T]
        eps = unet(x_T, T, class_labels=labels).sample
        out[f"{name}/1/rule"] = diff((x_T - (1 - abar).sqrt() * eps) / abar.sqrt(), refs[f"{name}/1/latent"])
        for k in case["steps"]:
            g = torch.Generator().manual_seed(spec["seed"])
            x = torch.randn(shape, generator=g)
            explicit = case["timesteps"].get(str(k))  # the export notes' grid where LCM's own selection differs
            scheduler.set_timesteps(timesteps=explicit) if explicit else scheduler.set_timesteps(k)
            out[f"{name}/{k}/timesteps"] = scheduler.timesteps.tolist()
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample
            out[f"{name}/{k}/scheduler"] = diff(x, refs[f"{name}/{k}/latent"])
assert not loaded(), loaded()
print(json.dumps(out))
"""


def _text_refs(pipe: FewStepPipeline, name: str, steps: list[int], refs: dict) -> None:
    for k in steps:
        for kind in ("latent", "pt"):
            refs[f"{name}/{k}/{kind}"] = pipe(PROMPTS, num_inference_steps=k, output_type=kind,
                                              generator=torch.Generator().manual_seed(SEED)).images


def _export_text(student, teacher_dir, out, name: str, refs: dict, spec: dict) -> None:
    """Export ``student`` and record our 1- and 4-step samples as the references for ``name``."""
    export_diffusers(student, teacher_dir, out, STEPS)
    pipe = FewStepPipeline.from_generator(student, teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    _text_refs(pipe, name, [1, 4], refs)
    spec["text"][name] = {"dir": str(out), "runs": [[1, None], [4, None]]}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, sd15_dir, text_student, class_student):
    """Export everything, compute our samples, and run the fresh-process comparison once."""
    from stepdistill.tiny_stacks import build_tiny_sdxl

    root = tmp_path_factory.mktemp("export")
    refs: dict[str, torch.Tensor] = {}
    spec = {"prompts": PROMPTS, "labels": LABELS, "seed": SEED, "text": {}}

    # SD1.5-like, through the CLI from a run directory (student/ copied, not re-saved)
    run = make_run(root / "run", text_student, sd15_dir)
    assert main(["export", f"run={run}", "format=diffusers", f"out={root / 'sd15'}"]) == 0
    pipe = FewStepPipeline.from_run(run)
    pipe.set_progress_bar_config(disable=True)
    _text_refs(pipe, "sd15", [1, 3, 4], refs)
    grid3 = generator_timesteps(text_student.schedule, 3)
    spec["text"]["sd15"] = {"dir": str(root / "sd15"), "runs": [[1, None], [4, None], [3, None], [3, grid3]]}

    # SD1.5-like with a v-prediction schedule
    v_teacher = shutil.copytree(sd15_dir, root / "sd15_v_teacher")
    config_file = v_teacher / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    _export_text(perturbed(load_denoiser(v_teacher), seed=3), v_teacher, root / "sd15_v", "sd15_v", refs, spec)

    # SDXL-like (two text encoders, text_time added conditioning)
    sdxl_dir = build_tiny_sdxl(root / "sdxl_teacher")
    _export_text(perturbed(load_denoiser(sdxl_dir), seed=4), sdxl_dir, root / "sdxl", "sdxl", refs, spec)

    # consistency students: an LCM with a guidance embedding (full export), an LCM-LoRA (format=lora)
    _export_text(lcm_student(sd15_dir), sd15_dir, root / "lcm_guided", "lcm_guided", refs, spec)
    spec["text"]["lcm_guided"]["guidance_scale"] = 3.0
    student, settings = lora_student(sd15_dir)
    lora_run = make_run(root / "lora_run", student, sd15_dir, **settings)
    assert main(["export", f"run={lora_run}", "format=lora", f"out={root / 'lora'}"]) == 0
    pipe = FewStepPipeline.from_run(lora_run)
    pipe.set_progress_bar_config(disable=True)
    _text_refs(pipe, "lora", [1, 4], refs)
    spec["lora"] = {"lora": {"dir": str(root / "lora"), "base": str(sd15_dir), "steps": [1, 4]}}

    # class-conditional UNet2DModel, from pure noise (t_max = 1), from timestep 699 (t_max = 0.7), and on
    # its own 4-step grid from timestep 300 (generator.timesteps; a run directory through the CLI)
    spec["class"] = {}
    late = Generator(class_student.denoiser, steps=STEPS, t_max=0.7, copy=False)
    own = Generator(class_student.denoiser, steps=4, t_max=0.3, timesteps=OWN_GRID, copy=False)
    own_run = make_run(root / "own_run", own, None, settings=own.settings())
    assert main(["export", f"run={own_run}", "format=diffusers", f"out={root / 'class_own'}"]) == 0
    for name, student in (("class", class_student), ("class07", late), ("class_own", own)):
        if name != "class_own":
            export_diffusers(student, None, root / name, STEPS)
        notes = json.loads((root / name / MARKER).read_text())
        pipe = FewStepPipeline.from_run(own_run) if name == "class_own" else FewStepPipeline.from_generator(student)
        for k in (1, 2, 4):
            refs[f"{name}/{k}/latent"] = pipe(class_labels=LABELS, num_inference_steps=k, output_type="latent",
                                              generator=torch.Generator().manual_seed(SEED)).images
        spec["class"][name] = {"dir": str(root / name), "steps": [1, 2, 4], "t_max": student.t_max,
                               "timesteps": {str(k): notes["timesteps"][str(k)] for k in (1, 2, 4)
                                             if k not in notes["default_timesteps_exact_for_steps"]}}

    torch.save(refs, root / "refs.pt")
    (root / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", FRESH, str(root)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"results": json.loads(proc.stdout.strip().splitlines()[-1]), "root": root}


LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj"]


def lcm_student(teacher_dir) -> ConsistencyGenerator:
    """An LCM student that takes the CFG scale (guidance embedding), every weight perturbed."""
    student = ConsistencyGenerator(load_denoiser(teacher_dir), steps=STEPS, guidance_embedding_dim=32,
                                   guidance_scale=3.0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return student.eval()


def lora_student(teacher_dir) -> tuple[ConsistencyGenerator, dict]:
    """An LCM-LoRA student on the teacher's own network (adapters perturbed; alpha != rank), and the
    ``make_run`` arguments that record its generator settings."""
    student = ConsistencyGenerator(Teacher(load_denoiser(teacher_dir)).denoiser, steps=STEPS, lora_rank=4,
                                   lora_alpha=8, lora_target_modules=LORA_MODULES)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, p in lora_named_parameters(student.denoiser.backbone):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student.eval(), {"settings": {**student.settings(), "lora_rank": 4}}


def _close(result: list[float], kind: str) -> bool:
    err, scale = result
    return err <= (IMAGE_ATOL if kind == "pt" else RAW_RTOL * max(1.0, scale))


@pytest.mark.parametrize("name,pipeline", [("sd15", "StableDiffusionPipeline"), ("sd15_v", "StableDiffusionPipeline"),
                                           ("sdxl", "StableDiffusionXLPipeline"),
                                           ("lcm_guided", "StableDiffusionPipeline"),
                                           ("lora", "StableDiffusionPipeline")])
def test_text_export_loads_as_a_standard_pipeline_with_lcm(fresh, name, pipeline):
    assert fresh["results"][f"{name}/pipeline"] == [pipeline, "LCMScheduler"]


@pytest.mark.parametrize("name", ["sd15", "sd15_v", "sdxl", "lcm_guided", "lora"])
@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("kind", ["latent", "pt"])
def test_text_export_reproduces_our_samples(fresh, name, steps, kind):
    result = fresh["results"][f"{name}/{steps}/{kind}"]
    assert _close(result, kind), result


def test_consistency_exports_record_their_scheduler(fresh):
    """LCM students export LCMScheduler with their boundary scaling and 50-point grid; the guided one
    tells the pipeline its scale; the LoRA export holds only the adapters."""
    root = fresh["root"]
    for name in ("lcm_guided", "lora"):
        config = json.loads((root / name / "scheduler" / "scheduler_config.json").read_text())
        assert (config["timestep_scaling"], config["original_inference_steps"]) == (10.0, 50)
    assert json.loads((root / "lcm_guided" / MARKER).read_text())["guidance_scale"] == 3.0
    assert sorted(p.name for p in (root / "lora").iterdir()) == ["README.md", "pytorch_lora_weights.safetensors",
                                                                 "scheduler", MARKER]
    assert "load_lora_weights" in (root / "lora" / "README.md").read_text()


def test_three_steps_need_the_explicit_grid(fresh):
    """LCM's default K = 3 selection is 999, 666, 333 (ours 999, 666, 332): pass timesteps= instead."""
    results = fresh["results"]
    assert not _close(results["sd15/3/pt"], "pt") or not _close(results["sd15/3/latent"], "latent")
    assert _close(results["sd15/3/timesteps/latent"], "latent") and _close(results["sd15/3/timesteps/pt"], "pt")


@pytest.mark.parametrize("name", ["class", "class07", "class_own"])
@pytest.mark.parametrize("key", ["1/rule", "1/scheduler", "2/scheduler", "4/scheduler"])
def test_class_export_reproduces_our_samples(fresh, name, key):
    result = fresh["results"][f"{name}/{key}"]
    assert _close(result, "latent"), result


def test_late_start_export_selects_timesteps_below_699(fresh):
    """t_max = 0.7: LCM's default selection is the generator's grid 699, 524, 349, 174 (not 999, ...)."""
    results = fresh["results"]
    assert results["class07/1/timesteps"] == [699] and results["class07/4/timesteps"] == [699, 524, 349, 174]
    assert results["class/4/timesteps"] == [999, 749, 499, 249]
    notes = json.loads((fresh["root"] / "class07" / "stepdistill_export.json").read_text())
    assert notes["original_inference_steps"] == 700 and notes["timesteps"]["1"] == [699]
    assert "abar[699]" in (fresh["root"] / "class07" / "README.md").read_text()


def test_own_grid_export_passes_its_timesteps(fresh):
    """generator.timesteps = 300, 150, 100, 50: the notes and README give that grid as timesteps= (LCM's
    own 4-step selection is 999, 749, 499, 249), and diffusers' LCMScheduler on it reproduces our samples."""
    notes = json.loads((fresh["root"] / "class_own" / MARKER).read_text())
    assert notes["timesteps"]["4"] == OWN_GRID and 4 not in notes["default_timesteps_exact_for_steps"]
    assert fresh["results"]["class_own/4/timesteps"] == OWN_GRID
    assert notes["timesteps"]["2"] == [300, 149]  # other step counts: the even grid from t_max
    assert f"timesteps={OWN_GRID}" in (fresh["root"] / "class_own" / "README.md").read_text()


def test_export_directory_contents(fresh):
    root = fresh["root"]
    notes = json.loads((root / "sd15" / "stepdistill_export.json").read_text())
    assert notes["steps"] == STEPS and notes["guidance_scale"] == 1.0 and notes["prediction_type"] == "epsilon"
    assert notes["timesteps"]["4"] == [999, 749, 499, 249] and notes["timesteps"]["3"] == [999, 666, 332]
    assert 3 not in notes["default_timesteps_exact_for_steps"] and {1, 2, 4, 8} <= set(
        notes["default_timesteps_exact_for_steps"])
    assert json.loads((root / "sd15_v" / "stepdistill_export.json").read_text())["prediction_type"] == "v_prediction"
    index = json.loads((root / "sdxl" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"] == ["diffusers", "LCMScheduler"]
    assert sorted(p.name for p in (root / "class").iterdir()) == ["README.md", "scheduler", "stepdistill_export.json",
                                                                  "unet"]
    assert "guidance_scale=1.0" in (root / "sd15" / "README.md").read_text()


# --------------------------------------------------------------------------- the scheduler, without a subprocess
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_lcm_timestep_selection_vs_our_trailing_grid(class_student, steps):
    scheduler = few_step_scheduler(class_student.schedule, class_student.denoiser.scheduler_config)
    scheduler.set_timesteps(steps)
    ours = generator_timesteps(class_student.schedule, steps)
    assert scheduler.timesteps.tolist() == lcm_timesteps(1000, steps)
    assert (scheduler.timesteps.tolist() == ours) == (steps != 3)
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(min(ours)))
    assert float(c_skip) < 1e-15 and float(c_out) == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("t_max,original,steps", [(1.0, 1000, (1, 5)), (0.7, 700, (1, 5)), (0.625, 625, (1, 5)),
                                                    (0.5, 501, (1, 3)), (0.3, 1000, (1, 5))])
def test_lcm_original_steps_start_the_selection_at_the_generators_first_timestep(class_student, t_max, original,
                                                                                 steps):
    """With M = T0 + 1 > N / 2 LCM's default K-step selection is the generator's grid (for K dividing M);
    below that LCM's training grid skips timesteps, so the grid must be passed as timesteps=."""
    assert lcm_original_steps(class_student.schedule, t_max) == original
    scheduler = few_step_scheduler(class_student.schedule, class_student.denoiser.scheduler_config, t_max=t_max)
    for k in steps:
        scheduler.set_timesteps(k)
        ours = generator_timesteps(class_student.schedule, k, t_max)
        assert scheduler.timesteps.tolist() == lcm_timesteps(1000, k, original)
        assert (scheduler.timesteps.tolist() == ours) == (t_max >= 0.5)


def test_scheduler_table_is_the_teachers(text_student, class_student):
    for student in (text_student, class_student):
        scheduler = few_step_scheduler(student.schedule, student.denoiser.scheduler_config)
        assert torch.equal(scheduler.alphas_cumprod.double(), student.schedule.alphas_cumprod)
    assert few_step_scheduler(text_student.schedule, text_student.denoiser.scheduler_config).config.beta_schedule \
        == "scaled_linear"


# --------------------------------------------------------------------------- bad input
def test_export_refuses_what_it_cannot_do(tmp_path, text_student, class_student):
    from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
    from stepdistill.schedules import NoiseSchedule

    with pytest.raises(StepdistillError, match="needs the teacher directory"):
        export_diffusers(text_student, None, tmp_path / "a")
    toy = Generator(ToyDenoiser(ToyMLP(num_classes=NUM_CLASSES, hidden=8, layers=1),
                                NoiseSchedule.vp("linear", 1000, 1e-4, 0.02), "eps"), copy=False)
    with pytest.raises(StepdistillError, match="cannot export a ToyMLP"):
        export_diffusers(toy, None, tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_overwrite_rules(tmp_path, class_student):
    out = export_diffusers(class_student, None, tmp_path / "out")
    with pytest.raises(StepdistillError, match="already exists and is not empty.*overwrite=true"):
        export_diffusers(class_student, None, out)
    assert export_diffusers(class_student, None, out, 2, overwrite=True) == out
    assert json.loads((out / "stepdistill_export.json").read_text())["steps"] == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StepdistillError, match="did not write"):
        export_diffusers(class_student, None, foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]
