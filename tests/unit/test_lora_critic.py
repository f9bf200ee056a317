"""A LoRA critic (``critic.lora_rank``): the fake score as a named peft adapter over the teacher's own
frozen base, beside a LoRA generator's adapter. The teacher computes with every adapter off, each role
with its own alone; each phase trains its own adapter only (also under DDP and gradient
checkpointing); the base is in memory once; runs resume exactly and export the student alone."""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointError

from stepdistill.algorithms.base import Batch
from stepdistill.algorithms.dmd2 import DMD2
from stepdistill.algorithms.fdistill import FDistill
from stepdistill.algorithms.sid import SiD
from stepdistill.cli import main
from stepdistill.commands.train import run
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import load_denoiser, wrap_backbone
from stepdistill.denoisers.toy import ToyDenoiser, ToyMLP
from stepdistill.lora import (
    ADAPTER,
    CRITIC_ADAPTER,
    active_adapter,
    adapter_of,
    gradient_checkpointing_func,
    lora_named_parameters,
    merged_backbone,
)
from stepdistill.roles import Critic, Generator, Teacher
from stepdistill.schedules import NoiseSchedule, Prediction
from stepdistill.tiny_stacks import tiny_stack_dir
from stepdistill.training.optim import OptimConfig
from stepdistill.training.settings import TrainerConfig
from stepdistill.training.trainer import Trainer

TOY_TARGETS = ["proj_in", "fc1", "fc2", "linear_1"]
#: the tiny SD experiments' LoRA targets (configs/lora/unet.yaml, used by tiny_sd/lcm_lora and tiny_sd/dmd2_lora)
SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
              "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def _toy_base() -> ToyDenoiser:
    torch.manual_seed(0)
    return ToyDenoiser(ToyMLP(num_classes=2, hidden=16, layers=2), NoiseSchedule.flow(), Prediction.FLOW)


def _nonzero_adapters(backbone: torch.nn.Module) -> None:
    """Random B (and A) weights in every adapter, so each one changes its role's output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in lora_named_parameters(backbone, None):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _toy_roles(critic_lora: bool = True, generator_lora: bool = True, head: bool = False,
               guidance: float = 2.0) -> tuple[Teacher, Generator, Critic, ToyDenoiser]:
    """(teacher, generator, critic, an untouched copy of the base) on the toy MLP."""
    base = _toy_base()
    fresh = copy.deepcopy(base)
    teacher = Teacher(base, guidance_scale=guidance)
    lora = {"lora_rank": 2, "lora_alpha": 4, "lora_target_modules": TOY_TARGETS}
    generator = Generator(teacher.denoiser, **(lora if generator_lora else {}))
    critic = Critic(teacher.denoiser, head=head, **({**lora, "lora_rank": 3} if critic_lora else {}))
    return teacher, generator, critic, fresh


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 2, generator=g), torch.rand(n, generator=g).double() * 0.9 + 0.05,
            Conditioning.labels(torch.arange(n) % 2, 2))


def _layers(backbone):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in backbone.modules() if isinstance(m, BaseTunerLayer)]


# ----------------------------------------------------------------- each role computes with its own adapter
def test_teacher_is_the_base_and_each_role_runs_its_own_adapter():
    teacher, generator, critic, fresh = _toy_roles()
    backbone = teacher.denoiser.backbone
    assert generator.denoiser is critic.denoiser is teacher.denoiser  # one network, not copies
    _nonzero_adapters(backbone)
    x, t, cond = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(teacher.predict(x, t, cond), Teacher(fresh, guidance_scale=2.0).predict(x, t, cond))
        only_student = wrap_backbone(merged_backbone(backbone, ADAPTER), teacher.schedule)
        only_critic = wrap_backbone(merged_backbone(backbone, CRITIC_ADAPTER), teacher.schedule)
        g_out, c_out = generator(x, t, cond), critic(x, t, cond)
        torch.testing.assert_close(g_out, only_student(x, t, cond, out=Prediction.X0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c_out, only_critic(x, t, cond, out=Prediction.X0), atol=1e-5, rtol=1e-5)
        assert (g_out - c_out).abs().max() > 1e-2 and (g_out - fresh(x, t, cond, out=Prediction.X0)).abs().max() > 1e-2


def test_the_selection_is_restored_after_exceptions_and_nests():
    teacher, generator, critic, _ = _toy_roles()
    layers = _layers(teacher.denoiser.backbone)
    default = [(m.active_adapters, m.disable_adapters) for m in layers]
    assert all(a == [ADAPTER] and not off for a, off in default)  # outside any block: the student's
    with active_adapter(teacher.denoiser.backbone, CRITIC_ADAPTER):
        assert all(m.active_adapters == [CRITIC_ADAPTER] and not m.disable_adapters for m in layers)
        with active_adapter(teacher.denoiser.backbone, None):
            assert all(m.disable_adapters for m in layers)
        assert all(m.active_adapters == [CRITIC_ADAPTER] and not m.disable_adapters for m in layers)
    x, t, cond = _inputs()
    for call in (lambda: critic(x[:, :1], t, cond), lambda: generator(x[:, :1], t, cond),
                 lambda: teacher.predict(x[:, :1], t, cond)):
        with pytest.raises(RuntimeError):  # a wrong input width fails inside the block
            call()
        assert [(m.active_adapters, m.disable_adapters) for m in layers] == default


def test_each_role_lists_its_own_parameters():
    teacher, generator, critic, _ = _toy_roles(head=True)
    algo = DMD2(teacher, generator, critic)

    names = {id(p): n for n, p in algo.named_parameters()}

    def owners(params):  # the adapter (else the role's submodule) of each trainable parameter
        return {adapter_of(names[id(p)]) or names[id(p)].split(".")[1] for p in params if p.requires_grad}

    assert owners(algo.parameters_of("generator")) == {ADAPTER}
    assert owners(algo.parameters_of("critic")) == {CRITIC_ADAPTER, "head"}
    teacher.requires_grad_(False)  # the trainer freezes the teacher: the roles' adapters stay trainable
    assert all(p.requires_grad for _, p in lora_named_parameters(teacher.denoiser.backbone, None))
    assert {id(p) for p in teacher.parameters()} == {id(p) for p in teacher.base_parameters()}
    critic_names = {n for n, _ in critic.named_parameters(prefix="x") if adapter_of(n)}
    assert critic_names and all(adapter_of(n) == CRITIC_ADAPTER for n in critic_names)
    # DDP leaves the other role's adapter to that role's wrapper
    assert generator._ddp_params_and_buffers_to_ignore == [
        n for n, _ in torch.nn.Module.named_parameters(generator) if adapter_of(n) == CRITIC_ADAPTER]
    assert critic._ddp_params_and_buffers_to_ignore and all(
        adapter_of(n) == ADAPTER for n in critic._ddp_params_and_buffers_to_ignore)


# ----------------------------------------------------------------- the phases train their own adapter
def _algorithm(name: str, generator_lora: bool = True):
    teacher, generator, critic, _ = _toy_roles(head=name != "sid", generator_lora=generator_lora)
    if name == "dmd2":
        return DMD2(teacher, generator, critic, critic_updates_per_generator_update=1, gan_generator_weight=0.1,
                    gan_critic_weight=0.1)
    if name == "fdistill":
        return FDistill(teacher, generator, critic, critic_updates_per_generator_update=1)
    return SiD(teacher, generator, critic, t_max=0.98, guidance_teacher=2.0)  # grad through the scores


def _phase_lists(algo) -> dict[str, list[torch.nn.Parameter]]:
    """What the trainer trains per phase: the parameters of ``trainable(phase)`` that require grad."""
    return {ph: [p for p in algo.parameters_of(ph) if p.requires_grad] for ph in algo.phases}


def _set_phase(lists: dict, phase: str) -> None:
    for params in lists.values():
        for p in params:
            p.requires_grad_(False)
    for p in lists[phase]:
        p.requires_grad_(True)


@pytest.mark.parametrize("generator_lora", [True, False], ids=["lora-generator", "full-generator"])
@pytest.mark.parametrize("name", ["dmd2", "fdistill", "sid"])
def test_each_phase_trains_only_its_own_adapter(name, generator_lora):
    torch.manual_seed(0)
    algo = _algorithm(name, generator_lora)
    _nonzero_adapters(algo.teacher.denoiser.backbone)
    lists = _phase_lists(algo)
    everything = list(dict.fromkeys(algo.parameters()))
    batch = Batch(Conditioning.labels(torch.arange(8) % 2, 2), torch.randn(8, 2))
    for step, phase in enumerate(["critic", "generator", "critic", "generator"]):
        _set_phase(lists, phase)
        for p in everything:
            p.grad = None
        out = algo.loss(phase, batch, step)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        mine = {id(p) for p in lists[phase]}
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lists[phase]), phase
        assert all(p.grad is None for p in everything if id(p) not in mine), phase
        with torch.no_grad():
            for p in lists[phase]:
                p.sub_(1e-2 * p.grad)


def test_sid_scores_the_teacher_on_the_base_with_autograd():
    algo = _algorithm("sid")
    _nonzero_adapters(algo.teacher.denoiser.backbone)
    x, t, cond = _inputs()
    x_t = x.clone().requires_grad_(True)
    y_real, y_fake, _ = algo._scores(x_t, t, cond, logits=False)
    with torch.no_grad():
        torch.testing.assert_close(y_real, algo.teacher.predict(x_t, t, cond, guidance_scale=2.0))
        torch.testing.assert_close(y_fake, algo.critic(x_t, t, cond))
    (grad,) = torch.autograd.grad(y_real.sum(), x_t)  # the gradient reaches x_t through the teacher
    assert grad.abs().sum() > 0
    assert all(p.grad is None for p in algo.parameters())


# ----------------------------------------------------------------- DDP and gradient checkpointing
def test_ddp_wrappers_synchronise_only_their_own_adapter(tmp_path):
    """Both roles wrapped as accelerate wraps them (one gloo process): without the roles' ignore list,
    the generator's wrapper also registers the critic's adapter and writes gradients into it in the
    generator phase (measured); with it, each phase's gradients land in its own adapter only."""
    algo = _algorithm("dmd2")
    lists = _phase_lists(algo)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        algo.generator, algo.critic = DistributedDataParallel(algo.generator), DistributedDataParallel(algo.critic)
        assert algo.generator.parameters_to_ignore == {
            n for n, _ in torch.nn.Module.named_parameters(algo.generator.module) if adapter_of(n) == CRITIC_ADAPTER}
        batch = Batch(Conditioning.labels(torch.arange(8) % 2, 2), torch.randn(8, 2))
        everything = list(dict.fromkeys(algo.parameters()))
        for step in range(4):
            phase = algo.phase(step)
            _set_phase(lists, phase)
            for p in everything:
                p.grad = None
            algo.loss(phase, batch, step).loss.backward()
            mine = {id(p) for p in lists[phase]}
            assert all(p.grad is None for p in everything if id(p) not in mine), (step, phase)
            assert all(p.grad is not None for p in lists[phase]), (step, phase)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sd15(one_thread):
    return tiny_stack_dir("sd15")


def test_gradient_checkpointing_recomputes_with_the_forwards_adapter(sd15):
    """Backward runs after every role's block has closed: diffusers' default checkpoint function then
    recomputes the critic with the student's adapter (torch notices here: the recomputation saves
    other tensors); ``gradient_checkpointing_func`` re-applies the forward's selection (the same
    gradients as without checkpointing)."""
    teacher = Teacher(load_denoiser(sd15))
    generator = Generator(teacher.denoiser, lora_rank=2, lora_target_modules=SD_TARGETS)
    critic = Critic(teacher.denoiser, lora_rank=2, lora_target_modules=SD_TARGETS)
    _nonzero_adapters(teacher.denoiser.backbone)
    generator.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = Conditioning(prompt_embeds=torch.randn(2, 16, 32, generator=g),
                        null_prompt_embeds=torch.zeros(2, 16, 32))
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    unet = teacher.denoiser.backbone

    def critic_grads() -> list[torch.Tensor]:
        critic.zero_grad(set_to_none=True)
        critic(x, t, cond).square().mean().backward()
        return [p.grad.clone() for _, p in lora_named_parameters(unet, CRITIC_ADAPTER)]

    plain = critic_grads()
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=gradient_checkpointing_func)
    for a, b in zip(critic_grads(), plain, strict=True):
        torch.testing.assert_close(a, b)
    unet.enable_gradient_checkpointing()  # diffusers' own function recomputes with the student's adapter
    with pytest.raises(CheckpointError, match="A different number of tensors was saved"):
        critic_grads()
    unet.disable_gradient_checkpointing()


# ----------------------------------------------------------------- the trainer: EMA, phases
def test_the_trainer_trains_each_adapter_in_its_phase_and_the_ema_follows_the_generator(tmp_path):
    from stepdistill.data.toy2d import ToyMixture
    from stepdistill.eval.tasks import Toy2DTask
    from stepdistill.training.trainer import TaskBatches

    algo = _algorithm("dmd2")
    backbone = algo.teacher.denoiser.backbone
    task = Toy2DTask(ToyMixture(modes=2, classes=2, radius=2.0, std=0.15), num_eval=16)
    trainer = Trainer(algo, TaskBatches(task, seed=1),
                      TrainerConfig(max_steps=4, batch_size=8, ema_decay=0.5, progress=False, cpu=True,
                                    sample_every=0, checkpoint_every=0),
                      OptimConfig(lr=1e-2, warmup_steps=0), tmp_path / "run")
    assert trainer.ema_phases == {"generator"}  # a critic step leaves the EMA alone
    ema_names = {n for n, _ in trainer.ema.model.named_parameters()}
    assert not any(adapter_of(n) == CRITIC_ADAPTER for n in ema_names)
    base = {n: p.detach().clone() for n, p in backbone.named_parameters() if adapter_of(n) is None}
    for step in range(4):
        before = {a: [p.detach().clone() for _, p in lora_named_parameters(backbone, a)]
                  for a in (ADAPTER, CRITIC_ADAPTER)}
        phase = trainer.train_step(step).phase
        trained = ADAPTER if phase == "generator" else CRITIC_ADAPTER
        for a, old in before.items():
            moved = any(not torch.equal(o, p) for o, (_, p) in zip(old, lora_named_parameters(backbone, a),
                                                                    strict=True))
            assert moved == (a == trained), (step, phase, a)
    assert all(torch.equal(p, base[n]) for n, p in backbone.named_parameters() if adapter_of(n) is None)


# ----------------------------------------------------------------- measured on the tiny SD stack
def _unique_storage_bytes(*modules: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for m in modules for p in m.parameters()}
    return sum(storages.values())


def test_tiny_sd_lora_critic_is_under_10_percent_and_the_base_is_in_memory_once(sd15):
    """Measured on the tiny SD1.5 UNet (792,964 weights): the rank-4 LoRA critic on the LCM-LoRA
    targets trains 72,832 parameters (9.2% of a full critic); the distinct storages of every role's
    parameters: full generator + full critic 9.52 MB (three bases), full generator + LoRA critic
    6.64 MB, LoRA generator + LoRA critic 3.75 MB (one base, 3.17 MB, and two adapters)."""
    def build(generator_lora: bool, critic_lora: bool):
        teacher = Teacher(load_denoiser(sd15))
        lora = {"lora_rank": 4, "lora_alpha": 4, "lora_target_modules": SD_TARGETS}
        generator = Generator(teacher.denoiser, **(lora if generator_lora else {}))
        return teacher, generator, Critic(teacher.denoiser, **(lora if critic_lora else {}))

    full = build(False, False)
    base = sum(p.numel() for p in full[0].base_parameters())
    base_bytes = _unique_storage_bytes(full[0])
    lora_critic = build(False, True)
    both = build(True, True)
    trainable = sum(p.numel() for p in lora_critic[2].parameters() if p.requires_grad)
    assert sum(p.numel() for p in full[2].parameters() if p.requires_grad) == base == 792_964
    assert trainable == 72_832 and trainable <= 0.10 * base
    adapter_bytes = 4 * trainable
    assert _unique_storage_bytes(*full) == 3 * base_bytes
    assert _unique_storage_bytes(*lora_critic) == 2 * base_bytes + adapter_bytes
    assert _unique_storage_bytes(*both) == base_bytes + 2 * adapter_bytes  # the base once
    teacher, generator, critic = both
    shared = {id(p) for p in teacher.base_parameters()}
    assert shared <= {id(p) for p in generator.parameters()} and shared <= {id(p) for p in critic.parameters()}


def test_tiny_sd_dmd2_lora_trains_resumes_exactly_and_exports_the_student_alone(sd15, tmp_path):
    args = ["experiment=tiny_sd/dmd2_lora", "trainer.max_steps=4", "trainer.batch_size=2",
            "trainer.checkpoint_every=2", "trainer.progress=false", "evaluate.enabled=false",
            "algorithm.critic_updates_per_generator_update=1"]
    first = run([*args, f"output_dir={tmp_path / 'a'}"])
    assert [h["phase"] for h in first.history] == ["critic", "generator"] * 2
    resumed = run([*args, f"output_dir={tmp_path / 'b'}", "trainer.gradient_checkpointing=true",
                   f"trainer.resume={tmp_path / 'a' / 'checkpoints' / 'checkpoint-2'}"])
    # steps 2, 3 retrained from the checkpoint (recomputing activations in backward): the same losses
    assert resumed.history == first.history
    algo = first.algorithm
    backbone = algo.teacher.denoiser.backbone
    teacher = Teacher(load_denoiser(sd15))
    for n, p in backbone.named_parameters():  # the shared base never trained
        if adapter_of(n) is None:
            torch.testing.assert_close(p, teacher.denoiser.backbone.get_parameter(n.replace(".base_layer", "")))
    assert all(p.abs().sum() > 0 for n, p in lora_named_parameters(backbone, CRITIC_ADAPTER) if ".lora_B." in n)
    student = tmp_path / "a" / "student"
    from safetensors.torch import load_file

    lora_keys = load_file(str(student / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora_keys and not any(CRITIC_ADAPTER in k for k in lora_keys)
    exported = load_denoiser(student)
    assert not any(".lora_" in n for n, _ in exported.backbone.named_parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = Conditioning(prompt_embeds=torch.randn(2, 16, 32, generator=g), null_prompt_embeds=torch.zeros(2, 16, 32))
    t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    with torch.no_grad():  # the student's adapter merged, the critic's left out
        torch.testing.assert_close(exported(x, t, cond, out=Prediction.X0), algo.generator(x, t, cond),
                                   atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "a" / "train.json").read_text())["iterations"] == 4


# ----------------------------------------------------------------- user errors
@pytest.mark.parametrize("override", ["critic.lora_rank=4", "+critic.lora_rank=4"])
def test_critic_lora_rank_without_a_critic_is_a_one_line_error(override, tmp_path, capsys):
    assert main(["train", "experiment=toy2d/lcm", override, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "critic.lora_rank given, but ConsistencyDistillation trains no critic" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"lora_rank": -1, "lora_target_modules": TOY_TARGETS}, "critic.lora_rank must be >= 1"),
    ({"lora_rank": 2}, "critic.lora_target_modules is required with critic.lora_rank"),
    ({"lora_rank": 2, "lora_target_modules": ["nope"]}, "critic.lora_target_modules ['nope'] match no module"),
])
def test_bad_critic_lora_settings_name_the_critic_key(kwargs, message):
    with pytest.raises(ValueError) as info:
        Critic(_toy_base(), **kwargs)
    assert message in str(info.value)
