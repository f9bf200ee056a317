"""Few-step sampling of a trained generator: one code path for the CLI, evaluation and a diffusers pipeline.

Everything that turns a ``Generator`` into samples goes through ``generate`` (one batch from one
``torch.Generator``); ``sample_student`` (a seed, batches) and ``FewStepPipeline.__call__`` (a
diffusers ``DiffusionPipeline``: prompts or class labels in, images out) are thin wrappers around it.

RNG order (what makes a seed reproducible, and what a diffusers pipeline with the exported
scheduler reproduces, see ``stepdistill.pipelines.export``), for one batch of B samples drawn from a
CPU ``torch.Generator`` ``rng``:

1. the initial noise ``torch.randn([B, *sample_shape], generator=rng)`` (float32, on the CPU), the
   sample at the grid's first time (``t_max``; pure noise at t = 1, as diffusers' ``prepare_latents``
   with ``init_noise_sigma = 1``);
2. then one fresh ``torch.randn([B, *sample_shape], generator=rng)`` per re-noising step: K - 1 draws
   for K steps, none for one step (``stepdistill.sampling.renoise_sample``).

Latent samples are decoded as diffusers' Stable Diffusion pipelines do (``decode_latents``). Loading a
training run's student (``load_run``, ``build_generator``) is ``stepdistill.pipelines.runs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from torch import Tensor

from stepdistill.conditioning import Conditioning
from stepdistill.data.prompts import PromptEncoder, TextStack
from stepdistill.denoisers.diffusers import config_size
from stepdistill.denoisers.loading import model_subfolder, resolve_local_dir, wrap_backbone
from stepdistill.errors import StepdistillError
from stepdistill.kernels.negative_steering import negative_prompt_steering
from stepdistill.pipelines.runs import build_generator, load_run
from stepdistill.pipelines.scheduler import few_step_scheduler
from stepdistill.roles import Generator
from stepdistill.schedules import NoiseSchedule

BACKBONE_NAMES = ("unet", "transformer", "denoiser")
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


# --------------------------------------------------------------------------- the one code path
@torch.no_grad()
def generate(generator: Generator, cond: Conditioning, steps: int | None, rng: torch.Generator,
             *, noise: Tensor | None = None) -> Tensor:
    """x0 [B, *sample_shape] for the batch ``cond`` (B = len(cond)), drawing from ``rng`` (CPU).

    Draws the initial noise first (unless ``noise`` is given), then ``Generator.sample`` draws one
    fresh noise per re-noising step; see the module docstring for the exact order.
    """
    param = next(generator.parameters())
    if noise is None:
        noise = torch.randn((len(cond), *generator.denoiser.sample_shape), generator=rng, device="cpu")
    noise = noise.to(param.device, param.dtype)
    return generator.sample(noise, cond.to(param.device), steps, generator=rng)


@torch.no_grad()
def sample_student(generator: Generator, cond: Conditioning, num: int | None = None, steps: int | None = None,
                   seed: int = 0, *, batch_size: int | None = None) -> Tensor:
    """``num`` generator samples (x0: pixels in [-1, 1], latents, or points) for ``cond``, from ``seed``.

    Args:
        generator: the trained few-step generator.
        cond: B conditions; B == num, or B == 1 (repeated ``num`` times).
        num: number of samples (default: ``len(cond)``).
        steps: generator steps K (default: ``generator.steps``).
        seed: seeds one CPU ``torch.Generator`` shared by all batches, used in order.
        batch_size: samples per forward (default: all at once).
    Returns:
        [num, *sample_shape] on the generator's device. With ``batch_size >= num`` this equals
        ``FewStepPipeline(...)(..., generator=torch.Generator().manual_seed(seed), output_type="latent")``
        and ``generate(generator, cond, steps, torch.Generator().manual_seed(seed))``; with smaller
        batches, it equals consecutive pipeline calls sharing one generator object.
    """
    num = len(cond) if num is None else int(num)
    if len(cond) != num:
        if len(cond) != 1:
            raise StepdistillError(f"got {len(cond)} conditions for {num} samples; pass 1 or {num}")
        cond = cond.repeat(num)
    rng = torch.Generator().manual_seed(int(seed))
    size = num if not batch_size else int(batch_size)
    chunks = [generate(generator, cond.index(slice(i, i + size)), steps, rng) for i in range(0, num, size)]
    return torch.cat(chunks)


def decode_latents(vae: Any, latents: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] from latents, as diffusers' SD / SDXL / SD3 pipelines decode them.

    SDXL VAEs with ``latents_mean`` / ``latents_std`` use them; otherwise ``latents / scaling_factor``
    (``+ shift_factor`` where the VAE defines one, as SD3's). Then ``(x / 2 + 0.5).clamp(0, 1)``.
    """
    config = vae.config
    latents = latents.to(next(vae.parameters()).dtype)
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, latents.shape[1], 1, 1)
        z = latents * torch.tensor(std).view(view).to(latents) / config.scaling_factor \
            + torch.tensor(mean).view(view).to(latents)
    else:
        z = latents / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            z = z + config.shift_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image * 0.5 + 0.5).clamp(0, 1)


def pixels_to_unit(x0: Tensor) -> Tensor:
    """Pixel-space samples in [-1, 1] to [0, 1] (as diffusers' DDPMPipeline)."""
    return (x0 / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- the pipeline
class FewStepPipeline(DiffusionPipeline):
    """A diffusers pipeline around a few-step generator (class labels, prompts, or unconditional).

    Components: one backbone (``unet`` | ``transformer`` | ``denoiser``), a ``scheduler`` whose config
    defines the noise schedule and prediction type (``few_step_scheduler``: LCM for VP, stochastic
    FlowMatchEuler for flow; ``__call__`` samples with ``stepdistill.roles.Generator.sample``, not with
    ``scheduler.step``), and for text-to-image a ``vae`` plus the text encoders / tokenizers of an
    SD1.5 (1), SDXL (2) or SD3 (2-3) stack.

    ``pipe(..., generator=torch.Generator().manual_seed(s), output_type="latent").images`` equals
    ``Generator.sample(noise, cond, K, generator=g)`` with ``g = torch.Generator().manual_seed(s)`` and
    ``noise = torch.randn([B, *shape], generator=g)`` drawn first (module docstring).

    Args:
        t_max: the generator's start time (1: pure noise).
        default_steps: K when ``num_inference_steps`` is not given.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->denoiser->vae"
    _optional_components = [*BACKBONE_NAMES, "vae", *TEXT_COMPONENTS]

    def __init__(self, scheduler: Any, unet: Any = None, transformer: Any = None, denoiser: Any = None,
                 vae: Any = None, text_encoder: Any = None, tokenizer: Any = None, text_encoder_2: Any = None,
                 tokenizer_2: Any = None, text_encoder_3: Any = None, tokenizer_3: Any = None,
                 t_max: float = 1.0, default_steps: int = 1, generator_settings: dict | None = None) -> None:
        super().__init__()
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, denoiser=denoiser,
                              vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(t_max=float(t_max), default_steps=int(default_steps),
                                generator_settings=generator_settings)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_generator(cls, generator: Generator, teacher_dir: str | Path | None = None,
                       **components: Any) -> FewStepPipeline:
        """Wrap a ``Generator`` (its backbone is shared, not copied); text stacks and the VAE are read
        from ``teacher_dir`` (a diffusers pipeline directory) unless passed as ``components``."""
        backbone = getattr(generator.denoiser.backbone, "module", generator.denoiser.backbone)
        base = getattr(generator.denoiser, "scheduler_config", None)
        parts: dict[str, Any] = {model_subfolder(backbone): backbone,
                                 "scheduler": few_step_scheduler(generator.schedule, base, generator.denoiser.prediction,
                                                                 generator.t_max)}
        if teacher_dir is not None:
            parts.update(load_text_components(teacher_dir))
        parts.update(components)
        pipe = cls(**parts, t_max=generator.t_max, default_steps=generator.steps,
                   generator_settings=generator.settings())
        if getattr(generator, "adapters", None) is not None:  # AGD: the adapters live outside the backbone
            pipe._adapted_student = generator
        return pipe

    @classmethod
    def from_run(cls, run_dir: str | Path, **components: Any) -> FewStepPipeline:
        """The pipeline of a training run (student/ + the teacher's VAE and text stack)."""
        run = load_run(run_dir)
        teacher = run.teacher_path if run.teacher_path is not None and run.teacher_path.is_dir() else None
        return cls.from_generator(run.generator, teacher, **components)

    # ----------------------------------------------------------------- parts
    @property
    def backbone(self) -> torch.nn.Module:
        for name in BACKBONE_NAMES:
            module = getattr(self, name, None)
            if module is not None:
                return module
        raise StepdistillError("FewStepPipeline has no backbone: pass unet=, transformer= or denoiser=")

    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_diffusers(self.scheduler)

    def student(self) -> Generator:
        """The ``Generator`` over this pipeline's backbone (shared, not copied); an AGD student is
        the generator the pipeline was built from (its adapters are not part of the backbone)."""
        if getattr(self, "_adapted_student", None) is not None:
            return self._adapted_student

        denoiser = wrap_backbone(self.backbone, self.schedule())
        settings = self.config.get("generator_settings") or {"steps": self.config.default_steps,
                                                             "t_max": self.config.t_max}
        return build_generator(settings, denoiser)

    def prompt_encoder(self) -> Any:
        if self.text_encoder is None or self.tokenizer is None:
            raise StepdistillError("this pipeline has no text encoder: pass class_labels= or batch_size=")
        time_ids = None
        if getattr(self, "transformer", None) is not None:
            stack = TextStack.SD3
        elif getattr(self, "text_encoder_2", None) is not None:
            stack = TextStack.SDXL
            size = config_size(self.backbone.config.sample_size) * self.vae_scale_factor
            time_ids = (size, size, 0, 0, size, size)
        else:
            stack = TextStack.SD15
        tokenizers = [self.tokenizer, getattr(self, "tokenizer_2", None), getattr(self, "tokenizer_3", None)]
        encoders = [self.text_encoder, getattr(self, "text_encoder_2", None), getattr(self, "text_encoder_3", None)]
        n = {TextStack.SD15: 1, TextStack.SDXL: 2, TextStack.SD3: 3}[stack]
        joint = self.backbone.config.get("joint_attention_dim") if stack == TextStack.SD3 else None
        return PromptEncoder(stack, tokenizers[:n], encoders[:n], time_ids=time_ids, joint_attention_dim=joint)

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def conditioning(self, prompt: str | list[str] | None = None, class_labels: Any = None,
                     batch_size: int | None = None, num_images_per_prompt: int = 1) -> Conditioning:
        """The ``Conditioning`` of one call: prompts, class labels, or ``batch_size`` unconditional."""
        if (prompt is not None) + (class_labels is not None) > 1:
            raise ValueError("pass prompt= or class_labels=, not both")
        if prompt is not None:
            cond = self.prompt_encoder().encode([prompt] if isinstance(prompt, str) else list(prompt))
        elif class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            cond = Conditioning(class_labels=labels)
        else:
            cond = Conditioning.none(int(batch_size or 1))
        return cond.repeat(num_images_per_prompt) if num_images_per_prompt > 1 else cond

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, class_labels: Any = None, *,
                 batch_size: int | None = None, num_inference_steps: int | None = None,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 latents: Tensor | None = None, output_type: str = "pil",
                 negative_prompt: str | list[str] | None = None, negative_scale: float = 0.5,
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        """Generate with K = ``num_inference_steps`` (default: the trained K) generator steps.

        Args:
            prompt: text prompts (text-to-image students).
            class_labels: class indices (class-conditional students).
            batch_size: number of samples for unconditional students.
            generator: a CPU ``torch.Generator`` (a fresh unseeded one when None).
            latents: initial noise [B, *shape] (then only the re-noising steps draw from ``generator``).
            output_type: "pil", "np", "pt" (images in [0, 1]) or "latent" (the raw x0: latents, pixels
                in [-1, 1], or points).
            negative_prompt: text to steer away from (one, or one per prompt): every cross-attention
                of the student subtracts ``negative_scale`` times its attention to this prompt
                (SNOOPI's NASA, ``stepdistill.kernels.negative_prompt_steering``); text students only.
            negative_scale: alpha, the weight of the negative attention (0: no steering).
        Returns:
            ``ImagePipelineOutput(images=...)`` (or ``(images,)``).
        """
        negative_embeds = None
        if negative_prompt is not None:
            negative_embeds = self.negative_embeddings(negative_prompt, prompt, num_images_per_prompt)
        cond = self.conditioning(prompt, class_labels, batch_size, num_images_per_prompt)
        rng = generator
        if rng is None:
            rng = torch.Generator()
            rng.seed()
        if negative_embeds is None:
            x0 = generate(self.student(), cond, num_inference_steps, rng, noise=latents)
        else:
            with negative_prompt_steering(self.backbone, negative_embeds, scale=negative_scale):
                x0 = generate(self.student(), cond, num_inference_steps, rng, noise=latents)
        images = self._postprocess(x0, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def negative_embeddings(self, negative_prompt: str | list[str], prompt: str | list[str] | None,
                            num_images_per_prompt: int = 1) -> Tensor:
        """The negative prompt's embeddings [1 or B, L, D] on the backbone's device and dtype."""
        if prompt is None or self.text_encoder is None:
            raise ValueError("negative_prompt= steers a text-to-image student's cross-attention: pass prompt= "
                             "with a text student (class-label and unconditional students take no negative prompt)")
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
        num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        if len(negatives) not in (1, num_prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {num_prompts} prompts; pass 1 or {num_prompts}")
        embeds = self.prompt_encoder().encode(negatives).prompt_embeds
        if len(negatives) > 1:
            embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        param = next(self.backbone.parameters())
        return embeds.to(param.device, param.dtype)

    def _postprocess(self, x0: Tensor, output_type: str) -> Any:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"unknown output_type {output_type!r}; expected pil, np, pt or latent")
        if output_type == "latent" or x0.dim() != 4:
            return x0
        images = decode_latents(self.vae, x0) if self.vae is not None else pixels_to_unit(x0)
        if output_type == "pt":
            return images
        array = images.cpu().permute(0, 2, 3, 1).float().numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)


def load_text_components(teacher_dir: str | Path) -> dict[str, Any]:
    """The VAE, tokenizers and text encoders of a local diffusers pipeline directory (those present)."""
    root = resolve_local_dir(teacher_dir)
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    parts: dict[str, Any] = {}
    for name in ("vae", *TEXT_COMPONENTS):
        entry = index.get(name)
        if not (root / name).is_dir() or not isinstance(entry, list) or entry[0] is None:
            continue
        library = diffusers if entry[0] == "diffusers" else transformers
        parts[name] = getattr(library, entry[1]).from_pretrained(str(root / name))
    return parts
