"""``stepdistill plan``: exact parameter counts on ``meta``, the accounting, fits / does not fit, the
suggestions, one-line errors, the generated docs table, the estimate against a measured CPU peak, and
the GPU check's dry run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.cli import main
from stepdistill.commands.plan import plan
from stepdistill.planner.estimate import GB, Job, estimate
from stepdistill.planner.presets import PRESETS, Component
from stepdistill.planner.stack import MetaStack, build, parameter_count, preset_stack
from stepdistill.planner.table import DOC, generated_part, memory_tables
from stepdistill.tiny_stacks import tiny_stack_dir

ROOT = Path(__file__).resolve().parents[2]

#: the denoisers' parameters (published architectures; /work/shared/REAL_SIZES.md)
DENOISERS = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "sd3-medium": 2_028_328_000, "sd35-medium": 2_243_171_520,
             # SD3.5-large with its published qk_norm="rms_norm" (38 x 4 x 64 more than without)
             "sd35-large": 8_056_627_520, "flux-dev": 11_901_408_320, "wan21-1.3b": 1_418_996_800,
             "wan21-14b": 14_288_491_584}
#: text encoders + VAE per preset: CLIP-L 123,060,480 (+ 768 x 768 projection), bigG 694,659,840, T5-XXL
#: 4,762,310,656, UMT5-XXL 5,680,910,336; SD VAE 83,653,863 (16-channel 83,819,683; Wan 126,892,531)
ENCODERS = {"sd15": 123_060_480, "sdxl": 123_060_480 + 694_659_840,
            "sd3-medium": 123_060_480 + 768 * 768 + 694_659_840 + 4_762_310_656,
            "flux-dev": 123_060_480 + 4_762_310_656, "wan21-14b": 5_680_910_336}
VAES = {"sd15": 83_653_863, "sdxl": 83_653_863, "sd3-medium": 83_819_683, "wan21-1.3b": 126_892_531}
#: LoRA rank 64 on the default targets (REAL_SIZES.md: 67.3 M, 196.8 M, 83.8 M, 261.7 M)
LORA_64 = {"sd15": 67_252_224, "sdxl": 196_751_360, "sd3-medium": 83_857_408, "flux-dev": 261_689_344}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_every_preset_has_the_published_parameter_counts():
    assert set(DENOISERS) == set(PRESETS)
    for name, count in DENOISERS.items():
        assert preset_stack(name).parameters == count, name
    for name, count in ENCODERS.items():
        assert preset_stack(name).text_encoder_parameters == count, name
    for name, count in VAES.items():
        assert preset_stack(name).vae_parameters == count, name
    qwen = build(Component("diffusers", "QwenImageTransformer2DModel", {}))  # REAL_SIZES' Qwen-Image row
    assert parameter_count(qwen) == 20_430_401_088 and next(qwen.parameters()).device.type == "meta"


def test_lora_counts_equal_peft_and_the_real_sizes():
    from stepdistill.lora import add_lora

    for name, count in LORA_64.items():
        assert preset_stack(name).lora_parameters(64) == count, name
    for kind in ("sd15", "sd3"):  # the analytic count equals peft's injection on the real tiny denoiser
        stack = MetaStack.from_dir(tiny_stack_dir(kind))
        backbone = MetaStack.from_dir(tiny_stack_dir(kind)).backbone
        add_lora(backbone, 4, 4, list(stack.default_lora_targets()))
        injected = sum(p.numel() for n, p in backbone.named_parameters() if ".lora_" in n)
        assert stack.lora_parameters(4) == injected > 0


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3"])
def test_teacher_path_counts_equal_the_loaded_tiny_models(kind):
    import diffusers
    import transformers

    root = tiny_stack_dir(kind)
    stack = MetaStack.from_dir(root)
    index = json.loads((root / "model_index.json").read_text())
    subfolder = "unet" if "unet" in index else "transformer"
    real = getattr(diffusers, index[subfolder][1]).from_pretrained(root / subfolder)
    assert stack.parameters == parameter_count(real)
    encoders = [getattr(transformers, v[1]).from_pretrained(root / k) for k, v in index.items()
                if k.startswith("text_encoder") and isinstance(v, list) and v[1]]
    assert stack.text_encoder_parameters == sum(parameter_count(e) for e in encoders) > 0
    assert stack.vae_parameters == parameter_count(diffusers.AutoencoderKL.from_pretrained(root / "vae"))


def test_plan_json_and_table(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "experiment=tiny_sd/dmd2", "gpus=1", "gpu_memory=24GB", f"out={out}"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert {"parameters", "per_gpu_bytes", "fits", "strategy", "suggestions", "roles"} <= set(result)
    assert set(result["parameters"]) == {"generator", "critic", "teacher", "text_encoders", "vae"}
    assert result["parameters"]["generator"] == result["parameters"]["teacher"] == result["parameters"]["critic"]
    assert result["per_gpu_bytes"] == pytest.approx(sum(r["total"] for r in result["roles"]), abs=1)
    assert result["fits"] is True and result["strategy"] == "ddp" and result["suggestions"] == []
    roles = {r["role"] for r in result["roles"]}
    assert {"generator", "critic", "teacher", "text encoders", "activations"} <= roles
    assert "fits" in printed and "GB per GPU" in printed


def _roles(result: dict) -> dict[str, dict]:
    return {r["role"]: r for r in result["roles"]}


def test_sdxl_dmd2_fits_8x80gb_as_shipped_and_not_with_ddp():
    shipped = plan(["experiment=sdxl/dmd2", "gpus=8", "gpu_memory=80GB"])
    fsdp = plan(["experiment=sdxl/dmd2", "gpus=8", "gpu_memory=80GB", "trainer.strategy=fsdp",
                 "trainer.gradient_checkpointing=true"])
    ddp = plan(["experiment=sdxl/dmd2", "gpus=8", "gpu_memory=80GB", "trainer.strategy=ddp"])
    assert shipped["fits"] and fsdp["fits"] and not ddp["fits"]
    assert ddp["per_gpu_bytes"] > 80e9 > fsdp["per_gpu_bytes"]
    n, teacher = 2_567_463_684, {"fp32": 4, "bf16": 2}[ddp["teacher_dtype"]]
    # DDP: every role whole; the gradient buckets of both trained roles stay allocated (4 bytes each)
    roles = _roles(ddp)
    assert roles["generator"]["weights"] == roles["critic"]["gradients"] == 4 * n
    assert roles["generator"]["optimizer"] == 8 * n and roles["teacher"]["weights"] == teacher * n
    # FSDP over 8: the trained roles' states / 8, the running phase's gradients only
    roles = _roles(fsdp)
    assert roles["generator"]["weights"] == pytest.approx(4 * n / 8)
    assert roles[fsdp["peak_phase"]]["gradients"] == pytest.approx(4 * n / 8)
    # the suggestions: FSDP alone makes the DDP job fit, and so does the combination
    fsdp_alone = next(s for s in ddp["suggestions"] if s["override"] == "trainer.strategy=fsdp")
    assert fsdp_alone["fits"] and ddp["suggested_combination"]["fits"]
    named = {s["override"] for s in ddp["suggestions"]}
    assert {"critic.lora_rank=64", "optim.name=adamw8bit", "data.cache=DIR"} <= named


def test_sdxl_dmd2_lora_24gb_fits_one_24gb_gpu():
    result = plan(["experiment=sdxl/dmd2_lora_24gb", "gpus=1", "gpu_memory=24GB"])
    assert result["fits"] and result["per_gpu_bytes"] < 24e9 and result["resolution"] == [1024, 1024]
    assert result["micro_batch"] == 1 and result["gradient_checkpointing"]
    roles = _roles(result)
    assert result["parameters"]["generator"] == result["parameters"]["critic"] == 196_751_360
    assert roles["teacher"]["weights"] == 2 * 2_567_463_684  # one bf16 base, shared by both LoRA roles
    assert roles["generator"]["optimizer"] == 2 * 196_751_360  # 8-bit AdamW
    assert "text encoders" not in roles  # cached embeddings
    # the same job with a full critic does not fit, and the planner names the LoRA critic
    full = plan(["experiment=sdxl/dmd2_lora_24gb", "gpus=1", "gpu_memory=24GB", "~critic.lora_rank"])
    assert not full["fits"] and any(s["override"] == "critic.lora_rank=64" and s["fits"] for s in full["suggestions"])


def test_states_reproduce_the_real_sizes_table():
    """REAL_SIZES.md's DDP column: trained roles at 16 bytes (DDP buckets hold both roles' gradients), a bf16
    teacher, no text encoders, activations excluded."""
    expected = {"sdxl": 87.3, "flux-dev": 404.6, "sd15": 29.2}
    for name, gb in expected.items():
        rows = estimate(preset_stack(name), Job(gpus=8, gpus_per_node=8, batch_size=8, teacher_dtype="bf16",
                                                cached=True, checkpointing=True)).rows
        states = sum(r.total for r in rows if r.role not in ("activations", "working"))
        assert round(states / GB, 1) == gb, name


BAD = {
    "unknown preset": (["backbone=sd4"], "unknown backbone preset 'sd4'; allowed: sd15, sdxl"),
    "memory": (["backbone=sd15", "gpu_memory=lots"], "gpu_memory='lots' is not a memory size"),
    "gpus": (["backbone=sd15", "gpus=0"], "gpus must be >= 1; got 0"),
    "nothing to size": (["gpus=8"], "choose what to size"),
    "batch": (["experiment=sdxl/dmd2", "gpus=3"], "trainer.batch_size=32 (the global batch) must be divisible"),
    "offload + lora": (["experiment=sdxl/dmd2", "critic.lora_rank=8", "trainer.teacher_placement=offload"],
                       "trainer.teacher_placement=offload: a LoRA"),
    "unsized denoiser": (["experiment=toy2d/dmd2"], "cannot size a 'ToyMLP' denoiser"),
    "no critic": (["experiment=sd15/lcm_lora", "critic.lora_rank=8"], "critic.lora_rank given, but ConsistencyDistillation"),
    "unknown experiment": (["experiment=sdxl/dmd3"], "unknown experiment 'sdxl/dmd3'; allowed:"),
    "resolution": (["backbone=sdxl", "resolution=1000"], "resolution 1000x1000 is not a multiple of 32"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, capsys):
    args, message = BAD[case]
    assert main(["plan", *args]) == 2
    # (only our lines: an installed torchao prints its own import warnings when transformers loads it)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stepdistill")]
    assert len(err) == 1 and err[0].startswith("stepdistill: error: ") and message in err[0], err


def test_docs_memory_tables_are_the_generated_one():
    assert generated_part(DOC.read_text()) == memory_tables(), "run: python -m stepdistill.planner.table"


# --------------------------------------------------------------------------- against a measured peak
#: a training run of the tiny stack in a fresh process: torch's CPU allocator peak (the profiler's
#: allocation events) over building and 4 steps (critic, generator, critic, generator: the last two
#: with every optimizer's state allocated), as the planner counts it
_MEASURE = """
import json, sys
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
from stepdistill.config import compose_train
from stepdistill.workflows.train import build_trainer
torch.set_num_threads(1)
cfg = compose_train(sys.argv[2:])
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    trainer = build_trainer(cfg, Path(sys.argv[1]))
    for step in range(4):
        trainer.train_step(step)
events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
live = peak = 0
for _, n in events:
    live += n
    peak = max(peak, live)
print(json.dumps({"peak": peak}))
"""


def _wide_tiny_stack(root: Path) -> Path:
    """The tiny SD1.5 stack with a wider UNet at a 64 x 64 latent (attention at 32 x 32 keeps it fast)."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_stack_dir("sd15"), root)
    shutil.rmtree(root / "unet")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, layers_per_block=1, block_out_channels=(64, 128), cross_attention_dim=32,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=8,
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")).save_pretrained(root / "unet")
    return root


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_the_measured_cpu_peak(tmp_path):
    stack = _wide_tiny_stack(tmp_path / "stack")
    overrides = ["experiment=tiny_sd/dmd2", f"teacher.path={stack}", "trainer.batch_size=2", "trainer.cpu=true",
                 "trainer.mixed_precision=no", "algorithm.critic_updates_per_generator_update=1",
                 "trainer.progress=false"]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "run"), *overrides,
                           f"output_dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    planned = plan([*overrides, "gpus=1"])
    assert planned["parameters"]["teacher"] == 3_885_764
    activations = _roles(planned)["activations"]["total"]
    assert activations > 0.5 * planned["per_gpu_bytes"] > 0.1e9  # activations and weights both count here
    assert abs(planned["per_gpu_bytes"] - measured) <= 0.25 * measured, (planned["per_gpu_bytes"], measured)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    script = ROOT / "scripts" / "gpu_check.py"
    assert subprocess.run([sys.executable, str(script), "--help"], capture_output=True).returncode == 0
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(script), "--dry-run", "--iterations", "2", "--jobs", "tiny_sd15",
                           "--out", str(out), "--work-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    (job,) = result["jobs"]
    assert result["device"] == "cpu" and job["status"] == "ran"
    assert set(job["seconds_per_iteration"]) == {"critic", "generator"}
    assert job["planner_bytes"] > 0 and job["peak_bytes"] > 0 and job["planner_fits"]
