"""Tiny text-to-image stacks (SD1.5-, SDXL- and SD3-like) with random weights, built in code.

They prove the wiring of the real diffusers pipelines without any download: every component is
built from a small config with a fixed seed, the CLIP / T5 tokenizers from a small in-memory
vocabulary (``WORDS``), and ``build_tiny_*`` saves the whole pipeline with ``save_pretrained`` so
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` / ``StableDiffusion3Pipeline``
``.from_pretrained(dir)`` (and ``load_denoiser(dir)``) read it back from disk, offline.

Sizes: SD1.5 / SDXL latents [B, 4, 8, 8] (images 16x16), SD3 latents [B, 16, 8, 8]; CLIP
sequences of ``MAX_LENGTH`` tokens. Building and one forward take well under a second on a CPU.
"""

from __future__ import annotations

import os
import shutil
import string
from collections import Counter
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from stepdistill.cache import cache_dir
from stepdistill.errors import StepdistillError

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SHAPES = ("circle", "square", "triangle", "star", "line", "ring")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
GLUE = ("a", "an", "the", "of", "on", "and", "with", "photo", "drawing", "digit", "small", "big")
#: every whole word the tiny tokenizers know as a single token (others split into characters)
WORDS: tuple[str, ...] = COLOURS + SHAPES + DIGITS + GLUE
#: the CLIP tokenizers' (and text encoders') sequence length
MAX_LENGTH = 16
SEED = 0

_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=MAX_LENGTH, hidden_act="gelu", projection_dim=32)
_SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)


# --------------------------------------------------------------------------- tokenizers
def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode alphabet (256 printable characters)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _bpe_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Greedy BPE training until every word is one token (most frequent pair first, ties by name)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(p for s in seqs for p in zip(s, s[1:], strict=False))
        if not counts:
            return merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == pair:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1


def tiny_clip_tokenizer(words: tuple[str, ...] = WORDS, max_length: int = MAX_LENGTH) -> Any:
    """A byte-level BPE ``CLIPTokenizer`` that knows ``words`` whole; ids laid out like CLIP's
    (256 bytes, 256 bytes + ``</w>``, merges, then ``<|startoftext|>``, ``<|endoftext|>``)."""
    alphabet = _byte_alphabet()
    merges = _bpe_merges(words)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges,
                         model_max_length=max_length)


def tiny_t5_tokenizer(words: tuple[str, ...] = WORDS) -> Any:
    """A unigram ``T5Tokenizer``: pad 0, eos 1, unk 2, then whole words and single characters."""
    chars = sorted({c for w in words for c in w} | set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _clip_text_model(tokenizer: Any, projection: bool, seed: int) -> Any:
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **_CLIP)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


# --------------------------------------------------------------------------- components
def _vae(latent_channels: int, seed: int, **extra: Any) -> Any:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=16, **extra).eval()


def sd15_components(seed: int = SEED) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionPipeline``: a tiny eps-prediction SD1.5-like stack."""
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32).eval()
    return dict(unet=unet, vae=_vae(4, seed + 1), text_encoder=_clip_text_model(tokenizer, False, seed + 2),
                tokenizer=tokenizer, scheduler=DDIMScheduler(**_SD_SCHEDULER), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def sdxl_components(seed: int = SEED) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusionXLPipeline``: two CLIP encoders, a "text_time" UNet."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, cross_attention_dim=2 * _CLIP["hidden_size"],
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + _CLIP["projection_dim"],
        norm_num_groups=32).eval()
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in _SD_SCHEDULER.items()
                                          if k not in ("clip_sample", "set_alpha_to_one")},
                                       timestep_spacing="leading")
    return dict(unet=unet, vae=_vae(4, seed + 1), text_encoder=_clip_text_model(tokenizer, False, seed + 2),
                text_encoder_2=_clip_text_model(tokenizer_2, True, seed + 3), tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, scheduler=scheduler)


def sd3_components(seed: int = SEED, with_t5: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``StableDiffusion3Pipeline``: a flow transformer, two CLIP encoders with
    projection and (unless ``with_t5=False``) a tiny T5 encoder; FlowMatchEuler with shift 3."""
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    joint_dim = 2 * _CLIP["hidden_size"]  # both CLIP hidden states side by side == T5's d_model
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=joint_dim,
        caption_projection_dim=32, pooled_projection_dim=2 * _CLIP["projection_dim"],
        pos_embed_max_size=8).eval()
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3 = tiny_t5_tokenizer()
        torch.manual_seed(seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_3), d_model=joint_dim, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    return dict(transformer=transformer,
                vae=_vae(16, seed + 1, shift_factor=0.0609, scaling_factor=1.5305,
                         use_quant_conv=False, use_post_quant_conv=False),
                text_encoder=_clip_text_model(tokenizer, True, seed + 2),
                text_encoder_2=_clip_text_model(tokenizer_2, True, seed + 3),
                text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                tokenizer_3=tokenizer_3, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


# --------------------------------------------------------------------------- builders
def _save(pipeline_cls: str, components: dict[str, Any], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    getattr(diffusers, pipeline_cls)(**components).save_pretrained(out)
    return out


def build_tiny_sd15(out_dir: str | Path, seed: int = SEED) -> Path:
    """Save a tiny SD1.5-like ``StableDiffusionPipeline`` to ``out_dir``; returns its path."""
    return _save("StableDiffusionPipeline", sd15_components(seed), out_dir)


def build_tiny_sdxl(out_dir: str | Path, seed: int = SEED) -> Path:
    """Save a tiny SDXL-like ``StableDiffusionXLPipeline`` to ``out_dir``; returns its path."""
    return _save("StableDiffusionXLPipeline", sdxl_components(seed), out_dir)


def build_tiny_sd3(out_dir: str | Path, seed: int = SEED, with_t5: bool = True) -> Path:
    """Save a tiny SD3-like ``StableDiffusion3Pipeline`` to ``out_dir``; returns its path.

    Without T5, diffusers leaves ``text_encoder_3`` out of the directory: load that one with
    ``StableDiffusion3Pipeline.from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)``.
    """
    return _save("StableDiffusion3Pipeline", sd3_components(seed, with_t5), out_dir)


def build_tiny_clip(out_dir: str | Path, seed: int = SEED) -> Path:
    """Save a tiny random ``CLIPModel`` + ``CLIPProcessor`` (hidden 32, 2 layers, 32x32 images in
    8x8 patches, 16-d projections, the tiny tokenizer) to ``out_dir`` as a real CLIP directory is
    laid out, for CLIP-score tests; returns its path."""
    tokenizer = tiny_clip_tokenizer()
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=MAX_LENGTH,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **tower),
        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    out = Path(out_dir)
    model.save_pretrained(out)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return out


BUILDERS = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3}


def tiny_stack_dir(kind: str) -> Path:
    """The tiny ``kind`` stack (sd15 | sdxl | sd3) under the cache, built on first use (deterministic:
    the same seed gives the same weights), so configs can name a local teacher without shipping one."""
    if kind not in BUILDERS:
        raise StepdistillError(f"unknown tiny stack {kind!r}; allowed: {', '.join(BUILDERS)}")
    out = cache_dir() / "tiny_stacks" / f"{kind}-seed{SEED}"
    if not (out / "model_index.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        BUILDERS[kind](tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process built it first
            shutil.rmtree(tmp, ignore_errors=True)
    return out
