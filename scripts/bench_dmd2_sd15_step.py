"""Time one DMD2 iteration at SD1.5 size (random weights, no download): seconds per critic and
generator step and peak GPU memory, with bf16 autocast and torch SDPA attention.

    python scripts/bench_dmd2_sd15_step.py [BATCH]        # SMALL=1 for a tiny UNet (CPU smoke run)

Prints and writes ``$OUT/sd15_bench.json`` (``/tmp`` without ``OUT``).
"""

import json
import os
import sys
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from stepdistill.algorithms.base import Batch
from stepdistill.algorithms.dmd2 import DMD2
from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import wrap_backbone
from stepdistill.roles import Critic, Generator, Teacher
from stepdistill.schedules import NoiseSchedule


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(small: bool, device: str) -> tuple[DMD2, dict, int, set]:
    schedule = NoiseSchedule.from_diffusers(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                          beta_end=0.012))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(32, 32, 64, 64) if small else (320, 640, 1280, 1280),
                                layers_per_block=1 if small else 2, norm_num_groups=8 if small else 32)
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    params = sum(p.numel() for p in unet.parameters())
    denoiser = wrap_backbone(unet, schedule)
    teacher = Teacher(denoiser, 1.75).to(device)
    generator = Generator(denoiser, steps=1).to(device)
    critic = Critic(denoiser, head=True).to(device)
    algo = DMD2(teacher, generator, critic, critic_updates_per_generator_update=10,
                gan_generator_weight=3e-3, gan_critic_weight=1e-2)
    optims = {"generator": torch.optim.AdamW(generator.parameters(), 5e-7),
              "critic": torch.optim.AdamW(critic.parameters(), 5e-7)}
    return algo, optims, params, processors


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch_size = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    algo, optims, params, processors = build(os.environ.get("SMALL") == "1", device)
    cond = Conditioning(prompt_embeds=torch.randn(batch_size, 77, 768, device=device),
                        null_prompt_embeds=torch.randn(1, 77, 768, device=device))
    batch = Batch(cond=cond, x0=torch.randn(batch_size, 4, 64, 64, device=device))
    result = {"unet_params_M": round(params / 1e6, 1), "attn_processors": sorted(processors),
              "batch": batch_size, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    for phase in ("critic", "generator"):
        for name, module in (("generator", algo.generator), ("critic", algo.critic)):
            module.train().requires_grad_(name == phase)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(6):
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16):
                out = algo.loss(phase, batch, 0)
            out.loss.backward()
            optims[phase].step()
            optims[phase].zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
            assert torch.isfinite(out.loss), out.loss
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        result[phase] = {"s_per_step": round(sorted(times[1:])[2], 3), "peak_GiB": peak and round(peak, 1),
                         "logs": {k: float(v) for k, v in out.logs.items()}}
    print(json.dumps(result, indent=1))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "sd15_bench.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
