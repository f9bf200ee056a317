"""The trainer's memory switches (``stepdistill.training.memory``, issue 21 section 2).

- ``trainer.gradient_checkpointing``: the same gradients (toy DMD2 with its GAN head, a LoRA generator
  sharing the teacher's UNet) and, on the tiny SD1.5 stack at a 64 x 64 latent, a DMD2 step whose peak
  memory is at least 30% lower (measured in a process of its own: ``python THIS_FILE STACK_DIR OUT``).
- ``trainer.attention``: sdpa equals diffusers' plain processor; the mapping to xformers and back
  round-trips (SD3's joint attention included); xformers on a CPU is a one-line error.
- ``trainer.teacher_placement=offload``: hooks on the teacher's blocks that run at every forward, the
  same teacher predictions, nothing else touched; a teacher shared with a LoRA generator is refused.
- The trainer applies them: a run with every switch on has the loss trajectory of a run without.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.kernels import attention_layers, set_model_attention, set_run_attention
from stepdistill.training.settings import TrainerConfig

#: the DMD2 step the memory test measures: 64 x 64 latents (the tiny stack's UNet config edited), batch 1
LATENT, BATCH = 64, 1
#: fp32 tolerance on gradients (recomputation repeats the same kernels: measured differences are 0)
GRAD_TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Single-threaded torch for the in-process tests (``one_thread`` in tests/conftest.py)."""


@pytest.fixture(autouse=True)
def _fresh_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# --------------------------------------------------------------------------- builders
def toy_dmd2(seed: int = 0, lora: bool = False, lora_critic: bool = False):
    """DMD2 over a 3-block ToyMLP teacher (flow matching), a one-step generator (a copy, or LoRA
    adapters on the teacher's own network) and a critic with a GAN head (a copy, or LoRA adapters on
    the same network); both GAN terms on; LoRA adapters start away from B = 0."""
    from stepdistill.algorithms.dmd2 import DMD2
    from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
    from stepdistill.roles import Critic, Generator, Teacher
    from stepdistill.schedules import NoiseSchedule, Prediction

    torch.manual_seed(seed)
    teacher = Teacher(ToyDenoiser(ToyMLP(num_classes=3, hidden=32, layers=3), NoiseSchedule.flow(), Prediction.FLOW),
                      guidance_scale=2.0)
    generator = Generator(teacher.denoiser, lora_rank=4 if lora else None,
                          lora_target_modules=["fc1", "fc2"] if lora else None)
    critic = Critic(teacher.denoiser, head=True, lora_rank=4 if lora_critic else None,
                    lora_target_modules=["fc1", "fc2"] if lora_critic else None)
    with torch.no_grad():
        for name, p in teacher.denoiser.backbone.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    return DMD2(teacher, generator, critic, critic_updates_per_generator_update=1, gan_generator_weight=0.5,
                gan_critic_weight=0.5)


def toy_batch():
    from stepdistill.algorithms.base import Batch
    from stepdistill.conditioning import Conditioning

    g = torch.Generator().manual_seed(1)
    return Batch(Conditioning.labels(torch.tensor([0, 1, 2, 0, 1, 2]), 3), torch.randn(6, 2, generator=g))


def phase_gradients(algorithm, batch, phase: str, step: int) -> dict[str, torch.Tensor]:
    """The gradients of ``phase``'s loss with seeded draws; ``requires_grad`` as the trainer sets it: on
    the phase's parameters that required grad when the algorithm was built (a LoRA generator: the
    adapters), off everywhere else."""
    phases = algorithm.__dict__.setdefault("_test_phase_params", {
        ph: [(n, p) for m in algorithm.trainable(ph) for n, p in m.named_parameters() if p.requires_grad]
        for ph in algorithm.phases})
    algorithm.requires_grad_(False)
    algorithm.zero_grad(set_to_none=True)
    for _, p in phases[phase]:
        p.requires_grad_(True)
    torch.manual_seed(123)
    algorithm.loss(phase, batch, step).loss.backward()
    return {n: p.grad.clone() for n, p in phases[phase] if p.grad is not None}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def switches(**kwargs) -> TrainerConfig:
    return TrainerConfig(**kwargs)


# --------------------------------------------------------------------------- gradient checkpointing
def test_toy_checkpointing_recomputes_only_with_grad_and_keeps_the_gradients(monkeypatch):
    from stepdistill.training.memory import apply_memory_switches

    plain, checked, batch = toy_dmd2(), toy_dmd2(), toy_batch()
    done = apply_memory_switches(checked, switches(gradient_checkpointing=True), "cpu")
    assert done["checkpointed"] == ["generator", "critic"] and done["attention_layers"] == 0
    assert checked.generator.denoiser.backbone.is_gradient_checkpointing
    assert checked.critic.denoiser.backbone.is_gradient_checkpointing
    assert not checked.teacher.denoiser.backbone.is_gradient_checkpointing
    for algo in (plain, checked):
        algo.train()
    assert checked.generator.training and checked.critic.training and not checked.teacher.training
    # the critic phase trains through the GAN head's hooked features, the generator phase through the
    # critic's logits and the teacher's (no-grad) predictions
    for phase, step in (("critic", 0), ("generator", 1)):
        assert max_diff(phase_gradients(plain, batch, phase, step), phase_gradients(checked, batch, phase, step)) \
            <= GRAD_TOL, phase
    # recomputation: a block runs twice per forward + backward with grad, once without grad (the teacher)
    from stepdistill.denoisers.toy import ToyBlock

    calls, forward = [], ToyBlock.forward
    monkeypatch.setattr(ToyBlock, "forward", lambda self, h, emb: (calls.append(1), forward(self, h, emb))[1])
    checked.critic.requires_grad_(True)
    x, t, cond = torch.randn(4, 2), torch.full((4,), 0.5, dtype=torch.float64), toy_batch().cond.index(slice(0, 4))
    checked.critic(x, t, cond).sum().backward()
    assert len(calls) == 2 * 3
    with torch.no_grad():
        checked.critic(x, t, cond)
    assert len(calls) == 3 * 3


def test_checkpointing_lora_roles_recomputes_with_their_own_adapters():
    """A LoRA generator and a LoRA critic on the teacher's one base: in backward no role's adapter is
    selected, so the recomputation re-applies the forward's selection; the gradients are the same."""
    from stepdistill.training.memory import apply_memory_switches

    plain, checked, batch = toy_dmd2(lora=True, lora_critic=True), toy_dmd2(lora=True, lora_critic=True), toy_batch()
    apply_memory_switches(checked, switches(gradient_checkpointing=True), "cpu")
    assert checked.generator.denoiser.backbone is checked.critic.denoiser.backbone
    for phase, step, adapter in (("critic", 0, ".critic."), ("generator", 1, ".student.")):
        grads = [phase_gradients(a.train(), batch, phase, step) for a in (plain, checked)]
        assert all(adapter in n or n.startswith("head.") for n in grads[0]) and max_diff(*grads) <= GRAD_TOL, phase


def test_checkpointing_a_lora_generator_on_the_teachers_unet(tiny_sd15):
    """The LoRA generator shares the teacher's UNet: checkpointing it keeps the generator's gradients,
    and the teacher (no grad) computes exactly what it did."""
    from stepdistill.training.memory import apply_memory_switches

    def build():
        from stepdistill.algorithms.dmd2 import DMD2
        from stepdistill.roles import Critic, Generator, Teacher

        torch.manual_seed(0)
        teacher = Teacher(tiny_sd15(), guidance_scale=1.75)
        generator = Generator(teacher.denoiser, lora_rank=4, lora_target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        with torch.no_grad():  # adapters away from their B = 0 start, so they change the output
            for n, p in generator.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        return DMD2(teacher, generator, Critic(teacher.denoiser), critic_updates_per_generator_update=1).train()

    plain, checked = build(), build()
    apply_memory_switches(checked, switches(gradient_checkpointing=True), "cpu")
    assert checked.teacher.denoiser.backbone is checked.generator.denoiser.backbone
    batch = sd15_batch(plain)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8], dtype=torch.float64)
    assert torch.equal(plain.teacher.predict(x, t, batch.cond), checked.teacher.predict(x, t, batch.cond))
    grads = [phase_gradients(a, batch, "generator", 1) for a in (plain, checked)]
    assert all(".lora_" in n for n in grads[0]) and max_diff(*grads) <= GRAD_TOL


def test_checkpointing_refuses_what_it_cannot_recompute(monkeypatch):
    from stepdistill.algorithms.agd import AdapterGuidanceDistillation
    from stepdistill.roles import AdapterGenerator
    from stepdistill.training.memory import apply_memory_switches

    algo = toy_dmd2()
    agd = AdapterGuidanceDistillation(algo.teacher, AdapterGenerator(algo.teacher.denoiser, kind="offset", dim=8))
    with pytest.raises(StepdistillError, match="set trainer.gradient_checkpointing=false") as err:
        apply_memory_switches(agd, switches(gradient_checkpointing=True), "cpu")
    assert "AGD" in str(err.value) and len(str(err.value).splitlines()) == 1
    monkeypatch.setattr(type(algo.generator.denoiser.backbone), "_supports_gradient_checkpointing", False)
    with pytest.raises(StepdistillError, match="the generator's ToyMLP does not support gradient checkpointing"):
        apply_memory_switches(algo, switches(gradient_checkpointing=True), "cpu")


@pytest.mark.slow
def test_checkpointing_lowers_the_peak_of_a_tiny_sd_dmd2_step_by_30_percent(tmp_path, one_thread):
    """The peak of torch's allocations during DMD2's critic and generator steps (loss + backward,
    tiny_sd/dmd2 as ``stepdistill train`` builds it, 64 x 64 latents, batch 1) with and without
    checkpointing, and the gradients of both (measured: critic 84.1 -> 34.3 MB, -59%; generator
    107.4 -> 40.0 MB, -63%; gradients identical)."""
    from stepdistill.tiny_stacks import tiny_stack_dir

    stack = tmp_path / "sd15_64"
    shutil.copytree(tiny_stack_dir("sd15"), stack)
    unet_config = stack / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "sample_size": LATENT}))
    result = measure_checkpointing(str(stack), batch_size=BATCH)
    print(json.dumps(result, indent=2))
    for phase in ("critic", "generator"):
        row = result[phase]
        assert row["grad_max_abs_diff"] <= GRAD_TOL, row
        assert row["saved"] >= 0.30, row


def measure_checkpointing(stack: str, batch_size: int) -> dict:
    """Torch's allocation peak of each DMD2 phase's loss + backward, checkpointed and plain, and the
    largest gradient difference between the two."""
    from stepdistill.bench.memory import allocation_peak
    from stepdistill.config import compose_train
    from stepdistill.training.memory import apply_memory_switches, trained_backbones
    from stepdistill.training.trainer import TaskBatches
    from stepdistill.workflows.teacher import build_task
    from stepdistill.workflows.train import build_algorithm

    cfg = compose_train(["experiment=tiny_sd/dmd2", f"teacher.path={stack}"])
    algorithm = build_algorithm(cfg, 0)
    batch = TaskBatches(build_task(cfg), 0)(0, batch_size)
    apply_memory_switches(algorithm, switches(gradient_checkpointing=True), "cpu")
    algorithm.train()
    peaks: dict[str, dict[str, int]] = {"critic": {}, "generator": {}}
    grads: dict[str, dict[str, dict]] = {"critic": {}, "generator": {}}
    for setting in ("checkpointed", "plain"):
        if setting == "plain":
            for backbone in trained_backbones(algorithm).values():
                backbone.disable_gradient_checkpointing()
        for phase, step in (("critic", 0), ("generator", algorithm.ratio)):
            grads[phase][setting], peaks[phase][setting] = allocation_peak(
                lambda phase=phase, step=step: phase_gradients(algorithm, batch, phase, step))
    result = {"latent": LATENT, "batch_size": batch_size,
              "shape": list(algorithm.generator.denoiser.sample_shape)}
    for phase, peak in peaks.items():
        result[phase] = {"peak_bytes_plain": peak["plain"], "peak_bytes_checkpointed": peak["checkpointed"],
                         "saved": 1 - peak["checkpointed"] / peak["plain"],
                         "grad_max_abs_diff": max_diff(grads[phase]["plain"], grads[phase]["checkpointed"]),
                         "grad_max_abs": max(float(g.abs().max()) for g in grads[phase]["plain"].values())}
    return result


# --------------------------------------------------------------------------- attention
@pytest.fixture(scope="module")
def tiny_sd15():
    from stepdistill.denoisers.loading import load_denoiser
    from stepdistill.tiny_stacks import tiny_stack_dir

    path = tiny_stack_dir("sd15")
    return lambda: load_denoiser(path)


def sd15_batch(algorithm):
    from stepdistill.algorithms.base import Batch
    from stepdistill.conditioning import Conditioning

    g = torch.Generator().manual_seed(2)
    return Batch(Conditioning(prompt_embeds=torch.randn(2, 16, 32, generator=g),
                              null_prompt_embeds=torch.randn(1, 16, 32, generator=g)))


def sd_inputs(denoiser, seed: int = 0):
    from stepdistill.conditioning import Conditioning

    g = torch.Generator().manual_seed(seed)
    config = denoiser.backbone.config
    width = config.get("cross_attention_dim") or config.get("joint_attention_dim")
    pooled = config.get("pooled_projection_dim")
    cond = Conditioning(prompt_embeds=torch.randn(2, 16, width, generator=g),
                        pooled_embeds=torch.randn(2, pooled, generator=g) if pooled else None)
    return torch.randn(2, *denoiser.sample_shape, generator=g), torch.tensor([0.3, 0.7], dtype=torch.float64), cond


def test_sdpa_equals_diffusers_plain_attention(tiny_sd15):
    from diffusers.models.attention_processor import AttnProcessor

    denoiser = tiny_sd15()
    denoiser.backbone.set_attn_processor(AttnProcessor())  # diffusers' matmul-softmax processor
    x, t, cond = sd_inputs(denoiser)
    with torch.no_grad():
        reference = denoiser(x, t, cond)
        switched = set_model_attention(denoiser, "sdpa", "cpu")
        out = denoiser(x, t, cond)
    assert len(switched) == 8 and set(switched.values()) == {"AttnProcessor2_0"}
    assert float((out - reference).abs().max()) <= 1e-5


@pytest.mark.parametrize("stack,sdpa,xformers", [("sd15", "AttnProcessor2_0", "XFormersAttnProcessor"),
                                                 ("sd3", "JointAttnProcessor2_0", "XFormersJointAttnProcessor")])
def test_the_xformers_mapping_round_trips(stack, sdpa, xformers, monkeypatch):
    """Where xformers runs (faked here: it is never called), each processor gets its xformers twin,
    SD3's joint attention included; switching back to sdpa gives the original outputs exactly."""
    from stepdistill.denoisers.loading import load_denoiser
    from stepdistill.tiny_stacks import tiny_stack_dir

    attention_module = sys.modules["stepdistill.kernels.attention"]
    denoiser = load_denoiser(tiny_stack_dir(stack))
    x, t, cond = sd_inputs(denoiser)
    with torch.no_grad():
        before = denoiser(x, t, cond)
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    assert set(set_model_attention(denoiser, "xformers", "cuda").values()) == {xformers}
    assert set(set_model_attention(denoiser, "sdpa", "cuda").values()) == {sdpa}
    with torch.no_grad():
        assert torch.equal(denoiser(x, t, cond), before)


def test_dispatched_processors_get_the_dispatchers_backend():
    """Flux-style processors (diffusers' attention dispatcher) take the backend by name: native = SDPA."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                   axes_dims_rope=(2, 2, 4))
    inputs = dict(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 3, 8),
                  pooled_projections=torch.randn(1, 8), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3))
    with torch.no_grad():
        before = model(**inputs).sample
        switched = set_model_attention(model, "sdpa", "cpu")
        after = model(**inputs).sample
    assert len(switched) == 2 and all(v.endswith("[native]") for v in switched.values())
    assert torch.equal(before, after)


def test_xformers_elsewhere_is_a_one_line_error(monkeypatch):
    from stepdistill.training.memory import apply_memory_switches

    attention_module = sys.modules["stepdistill.kernels.attention"]
    algo = toy_dmd2()
    if not attention_module.xformers_available():
        with pytest.raises(StepdistillError, match="pip install xformers") as err:
            apply_memory_switches(algo, switches(attention="xformers"), "cpu")
        assert len(str(err.value).splitlines()) == 1
    monkeypatch.setattr(attention_module, "xformers_available", lambda: True)
    with pytest.raises(StepdistillError, match=r"trainer.attention=xformers needs a CUDA device \(this run is on cpu\)"):
        apply_memory_switches(algo, switches(attention="xformers"), "cpu")


def test_attention_free_models_and_custom_processors_are_left_alone(tiny_sd15):
    from stepdistill.kernels import NegativeSteeringAttnProcessor

    assert set_model_attention(toy_dmd2(), "sdpa", "cpu") == {}
    denoiser = tiny_sd15()
    custom = NegativeSteeringAttnProcessor(torch.zeros(1, 16, 32))
    layers = attention_layers(denoiser)
    name = next(n for n in layers if n.endswith("attn2"))
    layers[name].set_processor(custom)
    assert name not in set_model_attention(denoiser, "sdpa", "cpu") and layers[name].processor is custom


def test_sampling_honours_the_runs_attention_where_it_can(monkeypatch, tiny_sd15):
    """``stepdistill sample`` (``set_run_attention``): the run's backend, sdpa where it cannot run."""
    denoiser = tiny_sd15()
    assert set(set_run_attention(denoiser, {"attention": "xformers"}, "cpu").values()) == {"AttnProcessor2_0"}
    assert set(set_run_attention(denoiser, None, "cpu").values()) == {"AttnProcessor2_0"}
    monkeypatch.setattr(sys.modules["stepdistill.kernels.attention"], "xformers_available", lambda: True)
    assert set(set_run_attention(denoiser, {"attention": "xformers"}, "cuda").values()) == {"XFormersAttnProcessor"}


# --------------------------------------------------------------------------- teacher offload
def test_offloaded_teacher_hooks_every_block_and_predicts_the_same(tiny_sd15, monkeypatch):
    from diffusers.hooks.group_offloading import ModuleGroup

    from stepdistill.algorithms.dmd2 import DMD2
    from stepdistill.roles import Critic, Generator, Teacher
    from stepdistill.training.memory import apply_memory_switches, offloaded_modules

    teacher = Teacher(tiny_sd15(), guidance_scale=1.75)
    algo = DMD2(teacher, Generator(teacher.denoiser), Critic(teacher.denoiser))
    x, t, cond = sd_inputs(teacher.denoiser)
    cond = cond.__class__(prompt_embeds=cond.prompt_embeds, null_prompt_embeds=torch.zeros(1, 16, 32))
    expected = teacher.predict(x, t, cond)
    trained = {n: p.detach().clone() for n, p in algo.named_parameters() if not n.startswith("teacher.")}
    done = apply_memory_switches(algo, switches(teacher_placement="offload"), "cpu")
    hooked = offloaded_modules(teacher.denoiser.backbone)
    # block level: each down / up block a group, the rest (conv_in, mid_block, ...) moved by the top level
    assert set(hooked) == {"", "down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"}
    assert done["offloaded_blocks"] == len(hooked)
    onloads = []
    original = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda self: (onloads.append(id(self)), original(self))[1])
    forwards = []
    handle = teacher.denoiser.backbone.register_forward_pre_hook(lambda *_: forwards.append(1))
    assert torch.equal(teacher.predict(x, t, cond), expected)
    handle.remove()
    assert forwards and len(onloads) == len(forwards) * len(hooked)  # every group moved in at every forward
    assert all(p.device.type == "cpu" for p in teacher.parameters())
    for role in (algo.generator, algo.critic):  # nothing else changed
        assert offloaded_modules(role.denoiser.backbone) == []
    assert all(torch.equal(p, trained[n]) for n, p in algo.named_parameters() if n in trained)


def test_offload_refuses_a_teacher_that_a_trained_role_shares():
    from stepdistill.training.memory import apply_memory_switches, offloaded_modules

    algo = toy_dmd2(lora=True)
    with pytest.raises(StepdistillError, match="the generator shares the teacher's network") as err:
        apply_memory_switches(algo, switches(teacher_placement="offload"), "cpu")
    assert "teacher_placement=replicate" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert offloaded_modules(algo.teacher.denoiser.backbone) == []


# --------------------------------------------------------------------------- the trainer
def test_the_trainer_applies_the_switches_and_the_run_is_unchanged(tmp_path):
    from stepdistill.data.toy2d import ToyMixture
    from stepdistill.eval.tasks import Toy2DTask
    from stepdistill.training.memory import offloaded_modules
    from stepdistill.training.optim import OptimConfig
    from stepdistill.training.trainer import TaskBatches, Trainer

    task = Toy2DTask(ToyMixture(modes=3, classes=3, radius=2.0, std=0.15), num_eval=16)

    def run(name: str, **extra):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        settings = TrainerConfig(max_steps=4, batch_size=6, checkpoint_every=0, sample_every=0, progress=False,
                                 cpu=True, ema_decay=None, seed=3, **extra)
        trainer = Trainer(toy_dmd2(), TaskBatches(task, seed=1), settings, OptimConfig(lr=1e-2, warmup_steps=0),
                          tmp_path / name, task=task)
        torch.manual_seed(5)
        losses = [trainer.train_step(step).loss for step in range(4)]
        return trainer, losses

    plain, plain_losses = run("plain")
    switched, losses = run("switched", gradient_checkpointing=True, teacher_placement="offload")
    assert switched.memory["checkpointed"] == ["generator", "critic"] and switched.memory["offloaded_blocks"] > 0
    assert offloaded_modules(switched.algorithm.teacher.denoiser.backbone)
    assert losses == plain_losses
    weights = [dict(t.algorithm.named_parameters()) for t in (plain, switched)]
    assert max(float((weights[0][n] - weights[1][n]).detach().abs().max()) for n in weights[0]) <= GRAD_TOL

