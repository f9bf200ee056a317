"""``teacher.dtype=bf16|fp16|fp32``: the frozen teacher's weights in that dtype (measured bytes), its
predictions close to the fp32 teacher's, the generator and critic fp32 copies of the fp32 weights (or,
for a LoRA generator, fp32 adapters on the one low-precision base), and a DMD2 step that runs."""

import pytest
import torch
from omegaconf import OmegaConf

from stepdistill.algorithms.base import Batch
from stepdistill.cli import main
from stepdistill.conditioning import Conditioning
from stepdistill.config import compose_train
from stepdistill.denoisers.loading import teacher_dtype
from stepdistill.tiny_stacks import tiny_stack_dir
from stepdistill.workflows.train import build_algorithm, build_trainer

#: relative error ||x0 - x0_fp32|| / ||x0_fp32|| of the tiny SD1.5 teacher's CFG (1.75) x0 predictions
#: at t in {0.1, 0.4, 0.7, 0.95}; measured 7.1e-3 (bf16) and 9.3e-4 (fp16)
TOLERANCE = {"bf16": 2e-2, "fp16": 3e-3}


@pytest.fixture(scope="module")
def dmd2(one_thread):
    tiny_stack_dir("sd15")
    return {d: build_algorithm(compose_train(["experiment=tiny_sd/dmd2", "output_dir=x", f"teacher.dtype={d}"]), 0)
            for d in ("fp32", "bf16", "fp16")}


def _inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.linspace(0.1, 0.95, n, dtype=torch.float64)
    cond = Conditioning(prompt_embeds=torch.randn(n, 16, 32, generator=g),
                        null_prompt_embeds=torch.randn(1, 16, 32, generator=g))
    return x_t, t, cond


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_teacher_takes_half_the_bytes_and_predicts_close(dmd2, dtype, torch_dtype):
    teacher, reference = dmd2[dtype].teacher, dmd2["fp32"].teacher
    assert {p.dtype for p in teacher.parameters()} == {torch_dtype}
    assert _bytes(reference.parameters()) == 3_171_856  # 792,964 parameters x 4 bytes
    assert 2 * _bytes(teacher.parameters()) == _bytes(reference.parameters())
    x_t, t, cond = _inputs()
    x0, x0_ref = teacher.predict(x_t, t, cond), reference.predict(x_t, t, cond)
    assert x0.dtype == torch.float32  # the caller's dtype: the schedule converts through x0 in float64
    error = float((x0 - x0_ref).norm() / x0_ref.norm())
    assert 0 < error < TOLERANCE[dtype]


def test_generator_and_critic_are_fp32_copies_of_the_fp32_weights(dmd2):
    algorithm, reference = dmd2["bf16"], dmd2["fp32"].teacher.denoiser.state_dict()
    teacher_storage = {p.data_ptr() for p in algorithm.teacher.parameters()}
    for role in (algorithm.generator, algorithm.critic):
        state = role.denoiser.state_dict()
        assert {v.dtype for v in state.values()} == {torch.float32}
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
        assert all(p.requires_grad and p.data_ptr() not in teacher_storage for p in role.parameters())


def test_lora_generator_trains_fp32_adapters_on_one_bf16_base(one_thread):
    tiny_stack_dir("sd15")
    built = {d: build_algorithm(compose_train(["experiment=tiny_sd/lcm_lora", "output_dir=x", f"teacher.dtype={d}"]), 0)
             for d in ("fp32", "bf16")}
    algorithm = built["bf16"]
    backbone = algorithm.teacher.denoiser.backbone
    assert algorithm.generator.denoiser.backbone is backbone  # one base, shared
    base = [p for n, p in backbone.named_parameters() if ".lora_" not in n]
    adapters = [p for n, p in backbone.named_parameters() if ".lora_" in n]
    reference_base = [p for n, p in built["fp32"].teacher.denoiser.backbone.named_parameters() if ".lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16} and 2 * _bytes(base) == _bytes(reference_base)
    assert adapters and {p.dtype for p in adapters} == {torch.float32} and all(p.requires_grad for p in adapters)
    x_t, t, cond = _inputs(2)
    # the adapters start at B = 0: the student's network is the teacher's (bf16) base exactly
    student = algorithm.generator.denoiser(x_t, t, cond)
    assert student.dtype == torch.float32
    assert torch.equal(student, algorithm.teacher.predict(x_t, t, cond, guidance_scale=1.0))
    loss = algorithm.loss("generator", Batch(cond=cond, x0=torch.randn(2, 4, 8, 8)), 0).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in base)
    grads = [p.grad for p in adapters if p.grad is not None]
    assert grads and {g.dtype for g in grads} == {torch.float32} and any(g.abs().sum() > 0 for g in grads)


def test_dmd2_steps_with_a_bf16_teacher(one_thread, tmp_path):
    tiny_stack_dir("sd15")
    records, trainers = {}, {}
    for dtype in ("fp32", "bf16"):
        cfg = compose_train(["experiment=tiny_sd/dmd2", f"output_dir={tmp_path / dtype}", f"teacher.dtype={dtype}",
                             "trainer.batch_size=2", "algorithm.critic_updates_per_generator_update=1"])
        trainer = trainers[dtype] = build_trainer(cfg, tmp_path / dtype)
        before = [p.detach().clone() for p in trainer.algorithm.teacher.parameters()]
        generator = [p.detach().clone() for p in trainer.algorithm.generator.parameters()]
        records[dtype] = [trainer.train_step(step) for step in range(2)]
        after = list(trainer.algorithm.teacher.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # frozen
        assert not all(torch.equal(a, b) for a, b in zip(generator, trainer.algorithm.generator.parameters(),
                                                         strict=True))
    assert {p.dtype for p in trainers["bf16"].algorithm.teacher.parameters()} == {torch.bfloat16}
    (critic, gen), (critic_ref, gen_ref) = records["bf16"], records["fp32"]
    assert (critic.phase, gen.phase) == ("critic", "generator") and not critic.skipped and not gen.skipped
    # the critic step does not call the teacher: identical; the generator's DMD gradient is the small
    # difference of two scores at initialisation, so the bf16 teacher's 0.7% shows more (measured
    # grad norms 0.82 vs 0.62)
    assert (critic.loss, critic.grad_norm) == (critic_ref.loss, critic_ref.grad_norm)
    assert torch.isfinite(torch.tensor([gen.loss, gen.grad_norm])).all()
    assert gen.grad_norm == pytest.approx(gen_ref.grad_norm, rel=0.5)


def test_bad_teacher_dtype_is_a_one_line_error(tmp_path, capsys):
    assert main(["train", "experiment=tiny_sd/dmd2", f"output_dir={tmp_path / 'run'}", "teacher.dtype=int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher.dtype='int8' is not one of fp32, bf16, fp16" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_runs_saved_without_the_key_keep_an_fp32_teacher():
    assert teacher_dtype(OmegaConf.create({"teacher": {"path": "x"}})) == torch.float32
    assert teacher_dtype(OmegaConf.create({"teacher": {"path": "x", "dtype": None}})) == torch.float32
