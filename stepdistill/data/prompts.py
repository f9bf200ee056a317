"""Prompts -> ``Conditioning``, with the text encoders of a local SD1.5 / SDXL / SD3 directory.

``PromptEncoder`` builds the same embeddings as the diffusers pipelines' ``encode_prompt``
(load components, not pipelines, for training):

- SD1.5: the CLIP encoder's last hidden state [B, 77, 768].
- SDXL: the penultimate hidden states of both CLIP encoders side by side [B, 77, 768 + 1280],
  pooled [B, 1280] from encoder 2 (its projection), and time ids [B, 6] = (original size, crop
  (0, 0), target size). The null condition is all zeros when the pipeline's
  ``force_zeros_for_empty_prompt`` is set and no negative prompt is given (as the pipeline does).
- SD3: penultimate hidden states of both CLIP encoders side by side, zero-padded to T5's width,
  followed by T5's last hidden state (zeros when there is no T5) along the sequence
  [B, 77 + max_sequence_length, 4096]; pooled [B, 768 + 1280] from both projections.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import torch
import transformers
from torch import Tensor, nn

from stepdistill.conditioning import Conditioning
from stepdistill.data.text_cache import ConditioningCache
from stepdistill.denoisers.loading import resolve_local_dir
from stepdistill.errors import StepdistillError


class TextStack(str, Enum):
    """Which pipeline's prompt encoding to reproduce."""

    SD15 = "sd15"
    SDXL = "sdxl"
    SD3 = "sd3"


def detect_stack(root: Path) -> TextStack:
    """SD1.5 / SDXL / SD3 from ``model_index.json``'s pipeline class, else from the subfolders."""
    index = root / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name", "") if index.is_file() else ""
    if "StableDiffusion3" in name or ((root / "transformer").is_dir() and (root / "text_encoder_2").is_dir()):
        return TextStack.SD3
    if "XL" in name or (root / "text_encoder_2").is_dir():
        return TextStack.SDXL
    if (root / "text_encoder").is_dir():
        return TextStack.SD15
    raise StepdistillError(f"no text encoder found in {str(root)!r}: expected a diffusers pipeline directory "
                           "with tokenizer/ and text_encoder/ (SD1.5), plus text_encoder_2/ (SDXL, SD3)")


class PromptEncoder(nn.Module):
    """Tokenizers + frozen text encoders that turn prompts into a ``Conditioning``.

    Args:
        stack: which pipeline's encoding to reproduce.
        tokenizers: one per encoder (SD1.5: 1; SDXL: 2; SD3: 2 CLIP + optional T5).
        text_encoders: matching transformers models (SD3's third may be None: zeros, as diffusers).
        time_ids: SDXL's [6] added time ids (original h, w, crop top, left, target h, w).
        force_zeros_for_empty_prompt: SDXL: an empty negative prompt means all-zero null embeddings.
        max_sequence_length: SD3's T5 sequence length (the pipeline's default is 256).
        joint_attention_dim: SD3's embedding width when there is no T5 (the transformer's config).
    """

    def __init__(self, stack: TextStack, tokenizers: list, text_encoders: list[nn.Module | None], *,
                 time_ids: tuple[int, ...] | None = None, force_zeros_for_empty_prompt: bool = False,
                 max_sequence_length: int = 256, joint_attention_dim: int | None = None) -> None:
        super().__init__()
        self.stack = TextStack(stack)
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList([e for e in text_encoders if e is not None])
        self.has_t5 = self.stack == TextStack.SD3 and len(text_encoders) > 2 and text_encoders[2] is not None
        self.time_ids = time_ids
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.max_sequence_length = int(max_sequence_length)
        self.joint_attention_dim = joint_attention_dim
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        max_sequence_length: int = 256) -> PromptEncoder:
        """Load the tokenizer(s) and text encoder(s) of a local diffusers pipeline directory."""
        transformers.utils.logging.disable_progress_bar()  # no per-load bars on stderr
        root = resolve_local_dir(path, "text encoder")
        stack = detect_stack(root)
        index_file = root / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        names = {TextStack.SD15: ("", ), TextStack.SDXL: ("", "_2"), TextStack.SD3: ("", "_2", "_3")}[stack]
        tokenizers, encoders = [], []
        for suffix in names:
            tok_dir, enc_dir = root / f"tokenizer{suffix}", root / f"text_encoder{suffix}"
            if not (enc_dir / "config.json").is_file():
                if suffix == "_3":  # SD3 runs without T5 (zeros in its place)
                    tokenizers.append(None)
                    encoders.append(None)
                    continue
                raise StepdistillError(f"missing {str(enc_dir)!r} for a {stack.value} text stack")
            tok_cls = getattr(transformers, _component_class(index, f"tokenizer{suffix}", "AutoTokenizer"))
            enc_cls = getattr(transformers, _component_class(index, f"text_encoder{suffix}", "AutoModel"))
            tokenizers.append(tok_cls.from_pretrained(str(tok_dir)))
            encoders.append(enc_cls.from_pretrained(str(enc_dir), **({"dtype": dtype} if dtype else {})))
        time_ids, joint_dim = None, None
        if stack == TextStack.SDXL:
            size = pixel_size(root) or 128 * _vae_scale_factor(root)
            time_ids = (size, size, 0, 0, size, size)
        if stack == TextStack.SD3:
            joint_dim = _config(root / "transformer").get("joint_attention_dim")
        return cls(stack, tokenizers, encoders, time_ids=time_ids,
                   force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", False),
                   max_sequence_length=max_sequence_length, joint_attention_dim=joint_dim)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders.parameters()).device

    # ----------------------------------------------------------------- encoding
    @torch.no_grad()
    def encode(self, prompts: list[str], negative: str = "") -> Conditioning:
        """Embeddings of ``prompts`` with the null condition from ``negative`` (for CFG).

        ``negative=""`` plays the pipeline's ``negative_prompt=None``: the encoded empty prompt, or
        zeros for SDXL with ``force_zeros_for_empty_prompt``.

        Returns:
            ``Conditioning`` with prompt_embeds [B, L, D], pooled_embeds [B, P] (SDXL, SD3),
            time_ids [B, 6] (SDXL), null_prompt_embeds [1, L, D], null_pooled_embeds [1, P].
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        embeds, pooled = self._encode(prompts)
        if self.force_zeros_for_empty_prompt and negative == "":
            null_embeds = torch.zeros_like(embeds[:1])
            null_pooled = None if pooled is None else torch.zeros_like(pooled[:1])
        else:
            null_embeds, null_pooled = self._encode([negative])
        time_ids = None
        if self.time_ids is not None:
            time_ids = torch.tensor([self.time_ids], dtype=embeds.dtype, device=embeds.device).expand(len(prompts), -1)
        return Conditioning(prompt_embeds=embeds, pooled_embeds=pooled, time_ids=time_ids,
                            null_prompt_embeds=null_embeds, null_pooled_embeds=null_pooled)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        if self.stack == TextStack.SD15:
            encoder = self.text_encoders[0]
            ids, mask = self._tokenize(self.tokenizers[0], prompts)
            use_mask = getattr(encoder.config, "use_attention_mask", False)
            return encoder(ids, attention_mask=mask if use_mask else None)[0], None
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2], strict=True):
            out = encoder(self._tokenize(tokenizer, prompts)[0], output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        if self.stack == TextStack.SDXL:  # pooled only from the last encoder (with projection)
            return torch.cat(hidden, dim=-1), pooled[-1]
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(prompts, clip)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def _t5(self, prompts: list[str], clip: Tensor) -> Tensor:
        """SD3's T5 tokens [B, max_sequence_length, D_joint]; zeros when there is no T5."""
        if not self.has_t5:
            width = self.joint_attention_dim or clip.shape[-1]
            return clip.new_zeros(len(prompts), self.max_sequence_length, width)
        ids, _ = self._tokenize(self.tokenizers[2], prompts, self.max_sequence_length)
        return self.text_encoders[2](ids)[0].to(clip.dtype)

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        enc = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)


def _config(folder: Path) -> dict:
    file = folder / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _vae_scale_factor(root: Path) -> int:
    return 2 ** (len(_config(root / "vae").get("block_out_channels", [0] * 4)) - 1)


def pixel_size(root: str | Path) -> int | None:
    """Side in pixels of the images a pipeline directory's denoiser was built for: its ``sample_size``
    (in latents) times the VAE's downsampling (SD1.5 512, SDXL 1024); None when its config gives none."""
    root = Path(root)
    for folder in ("unet", "transformer"):
        size = _config(root / folder).get("sample_size")
        if size:
            return int(size) * _vae_scale_factor(root)
    return None


def _component_class(index: dict, name: str, default: str) -> str:
    """The transformers class ``model_index.json`` names for a component (e.g. CLIPTextModel)."""
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else default


class PromptData:
    """Training prompts for data-free distillation: a text file (one prompt per line; blank lines
    and lines starting with ``#`` skipped) or an inline list.

    Args:
        file: path of the prompt file.
        prompts: the prompts themselves (instead of ``file``).
        cache: a directory written by ``stepdistill cache`` for these prompts and the teacher's text
            encoders (``stepdistill.data.text_cache``): the task then reads their embeddings from it and
            never loads the encoders. None: the task encodes the drawn prompts at every step.
    """

    def __init__(self, file: str | None = None, prompts: list[str] | None = None,
                 cache: str | None = None) -> None:
        if (file is None) == (prompts is None):
            raise StepdistillError("data needs exactly one of data.file=<prompts.txt> and data.prompts=[...]")
        if file is not None:
            path = Path(str(file)).expanduser()
            if not path.is_file():
                raise StepdistillError(f"prompt file not found: {str(path)!r} (one prompt per line; "
                                       "set data.file=<path>)")
            lines = [line.strip() for line in path.read_text().splitlines()]
            prompts = [line for line in lines if line and not line.startswith("#")]
        self.prompts = [str(p) for p in prompts or []]
        if not self.prompts:
            raise StepdistillError("the prompt list is empty: give at least one prompt")
        self.cache = None
        if cache is not None:
            self.cache = ConditioningCache(cache)
            self.cache.check_rows(self.cache_rows(), f"the prompts of data.file={file!r}" if file is not None
                                  else "data.prompts")

    def cache_rows(self) -> list[str]:
        """What the cache's rows are made of (their hash ties a cache to this data)."""
        return self.prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn uniformly with replacement (the same on every process for one generator)."""
        index = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in index.tolist()]
