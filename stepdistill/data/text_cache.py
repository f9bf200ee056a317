"""Cached conditioning: every training prompt's text embeddings (and every training image's VAE
latents) computed once by ``stepdistill cache`` and read back by training, so the training processes
never load the text encoders (or the VAE).

Why: the text encoders are frozen, yet without a cache every process holds them in fp32 and runs them
at every step. At real size that is CLIP-L 123 M parameters (0.5 GB, SD1.5), CLIP-L + bigG 818 M
(3.3 GB, SDXL) and, for SD3, T5-XXL's 4.76 B more (22.3 GB with both CLIPs) per GPU.

Layout of a cache directory::

    index.json               format, version, teacher, encoder_hash, vae_hash, dtype, negative_prompt,
                             max_sequence_length, rows_hash, num_rows, shard_size, num_shards, tensors
                             (name -> per-row shape), prompts (the rows' prompts, in row order)
    null.safetensors         null_prompt_embeds [1, L, D], null_pooled_embeds [1, P], time_ids [1, 6]
    shard-00000.safetensors  rows [0, shard_size): prompt_embeds [n, L, D], pooled_embeds [n, P]
                             (SDXL, SD3), latents [n, C, h, w] (captioned images)
    shard-00001.safetensors  rows [shard_size, 2 shard_size) ...

Disk per prompt in fp32 (bf16 halves it): SD1.5 237 KB (77 x 768 x 4 B), SDXL 636 KB (77 x 2048 + pooled
1280), SD3 5.46 MB (333 x 4096 + pooled 2048: CLIP's 77 tokens zero-padded to T5's width, then 256 T5
tokens), so 10,000 SD3 prompts take 55 GB.

Row i is the data's row i (``PromptData.prompts[i]``, or ``ImageCaptionData``'s i-th image and its
caption). Every file is written to a temporary name and renamed, so a shard that exists is whole; a
re-run keeps the whole shards that check out (size and row count) and redoes the rest. Writing holds
one shard in memory (about ``SHARD_BYTES`` with the automatic size), reading memory-maps single rows.

A cache serves a run only when it was made from the same rows (``rows_hash``: the prompts, or the
captions, file names and resolution), the same text encoders (``encoder_hash``: their tokenizers,
configs, a sampled hash of their weight files, and the teacher settings the embeddings depend on),
the same negative prompt, and for images the same VAE (``vae_hash``). Anything else is a one-line
error naming the fix (re-run ``stepdistill cache``).

The cache holds the training rows only. Commands that need other prompts after training
(``stepdistill sample``, ``eval-coco``, ``eval-clip``) load the teacher's encoders themselves, in their
own process once training has ended.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from stepdistill.conditioning import Conditioning
from stepdistill.denoisers.loading import resolve_local_dir
from stepdistill.errors import StepdistillError

FORMAT, VERSION = "stepdistill-conditioning-cache", 1
INDEX, NULL = "index.json", "null.safetensors"
#: the automatic shard size: rows per shard so that one shard is about this many bytes
SHARD_BYTES = 256 * 2**20
#: SD3's T5 sequence length the prompt task encodes with (``PromptEncoder``'s default)
MAX_SEQUENCE_LENGTH = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: config keys that change between saves of the same model (not part of any hash)
_VOLATILE = ("_name_or_path", "name_or_path", "transformers_version", "_diffusers_version", "_commit_hash")
_SAMPLE = 1 << 16  # bytes hashed at each of three places of a weight file
_FIX = "re-run `stepdistill cache` with the run's data, teacher.path and out={dir} overwrite=true"


# ----------------------------------------------------------------------------- fingerprints
def rows_hash(rows: object) -> str:
    """sha256 of the rows' JSON (the prompts, or captions + file names + resolution)."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _config(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _file_digest(path: Path, sampled: bool) -> str:
    """sha256 of a file: JSON without volatile keys, weights sampled (size + 3 x 64 KiB), else whole."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in _VOLATILE}
        return rows_hash(data)
    h = hashlib.sha256()
    if not sampled:
        h.update(path.read_bytes())
        return h.hexdigest()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        for offset in (0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def _folder_digest(folder: Path) -> dict[str, str]:
    weights = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
    return {str(f.relative_to(folder)): _file_digest(f, f.suffix in weights)
            for f in sorted(folder.rglob("*")) if f.is_file()}


def encoder_fingerprint(teacher: str | Path, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> str:
    """What a pipeline directory's prompt embeddings depend on, hashed without loading anything:
    its tokenizers, text encoders (configs, and weight files sampled at three places), the
    ``model_index.json`` entries of both, ``force_zeros_for_empty_prompt``, the denoiser's
    ``sample_size`` / ``joint_attention_dim`` and the VAE's depth (SDXL's time ids, SD3's width)."""
    root = Path(teacher)
    index = _config(root / "model_index.json")
    parts: dict[str, object] = {"max_sequence_length": int(max_sequence_length),
                                "force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt")}
    for folder in sorted(root.glob("tokenizer*")) + sorted(root.glob("text_encoder*")):
        if folder.is_dir():
            parts[folder.name] = [index.get(folder.name), _folder_digest(folder)]
    for folder, keys in (("unet", ("sample_size",)), ("transformer", ("sample_size", "joint_attention_dim")),
                         ("vae", ("block_out_channels",))):
        config = _config(root / folder / "config.json")
        parts[folder] = [config.get(k) for k in keys]
    return rows_hash(parts)[:16]


def vae_fingerprint(teacher: str | Path) -> str:
    """The VAE's config and (sampled) weights: what the cached latents depend on."""
    return rows_hash(_folder_digest(Path(teacher) / "vae"))[:16]


@dataclass(frozen=True)
class CacheKey:
    """What a cache is made from; it serves a run only when all but ``teacher`` match.

    Attributes:
        teacher: the pipeline directory it was encoded with (for the messages).
        encoder_hash: ``encoder_fingerprint(teacher)``.
        rows_hash: ``rows_hash`` of the data's rows.
        num_rows: the number of rows.
        negative_prompt: the null condition's prompt (the task's ``negative_prompt``).
        dtype: the stored dtype, fp32 | bf16 | fp16 (read back as float32).
        vae_hash: ``vae_fingerprint(teacher)`` when the rows are images, else None.
        max_sequence_length: SD3's T5 length.
    """

    teacher: str
    encoder_hash: str
    rows_hash: str
    num_rows: int
    negative_prompt: str = ""
    dtype: str = "fp32"
    vae_hash: str | None = None
    max_sequence_length: int = MAX_SEQUENCE_LENGTH

    def differences(self, index: dict) -> list[str]:
        """The fields (except ``teacher``) where ``index`` disagrees with this key."""
        return [k for k, v in asdict(self).items() if k != "teacher" and index.get(k) != v]


# ----------------------------------------------------------------------------- files
def shard_path(root: Path, index: int) -> Path:
    return root / f"shard-{index:05d}.safetensors"


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary name in the same directory, then rename: a file that exists is whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _whole(path: Path, num_rows: int) -> bool:
    """A safetensors file whose size matches its header and whose metadata says ``num_rows`` rows."""
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        rows = int(header.get("__metadata__", {}).get("num_rows", -1))
        return path.stat().st_size == 8 + length + end and rows == num_rows
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _read_index(root: Path) -> dict | None:
    file = root / INDEX
    if not file.is_file():
        return None
    try:
        index = json.loads(file.read_text())
    except ValueError:
        index = {}
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise StepdistillError(f"{str(file)!r} is not a stepdistill conditioning cache (version {VERSION}): "
                               + _FIX.format(dir=root))
    return index


# ----------------------------------------------------------------------------- writing
def write_cache(out: str | Path, key: CacheKey, prompts: Sequence[str],
                encode: Callable[[int, int], dict[str, Tensor]], encode_null: Callable[[], dict[str, Tensor]],
                *, batch_size: int = 64, shard_size: int = 0, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Write (or finish) the cache of ``key``'s rows in ``out``, shard by shard.

    Args:
        prompts: the rows' prompts, in row order (recorded in the index).
        encode: ``(start, stop) -> {"prompt_embeds": [n, L, D], "pooled_embeds": [n, P],
            "latents": [n, C, h, w]}`` of rows [start, stop) (the keys the data has).
        encode_null: ``() -> {"null_prompt_embeds": [1, L, D], "null_pooled_embeds": [1, P],
            "time_ids": [1, 6]}`` (those present).
        batch_size: rows per ``encode`` call.
        shard_size: rows per shard; 0: about ``SHARD_BYTES`` per shard.
        overwrite: replace a cache of other rows / encoders in ``out`` (only the cache's own files).
    Returns:
        ``{"rows", "shards", "written", "bytes"}`` (``written``: shards encoded by this call).
    """
    root = Path(out)
    index = _prepare_dir(root, key, overwrite)
    if index is None:
        index = _new_index(root, key, prompts, encode, shard_size)
    elif shard_size and shard_size != index["shard_size"]:
        raise StepdistillError(f"{str(root)!r} holds a cache in shards of {index['shard_size']} rows: drop "
                               f"shard_size={shard_size} to finish it, or pass overwrite=true")
    for stale in root.glob(".*.tmp-*"):  # a write that was interrupted
        stale.unlink()
    if not _whole(root / NULL, 1):
        _atomic_save({k: v.to(DTYPES[key.dtype]) if k != "time_ids" else v.float()
                      for k, v in encode_null().items()}, root / NULL, {"num_rows": "1"})
    size, total = index["shard_size"], index["num_rows"]
    todo = [s for s in range(index["num_shards"])
            if not _whole(shard_path(root, s), min(size, total - s * size))]
    bar = _progress(total, total - sum(min(size, total - s * size) for s in todo), progress)
    for s in todo:
        start, stop = s * size, min(total, (s + 1) * size)
        _write_shard(root, s, start, stop, encode, batch_size, DTYPES[key.dtype], bar)
    if bar is not None:
        bar.close()
    written = sum(f.stat().st_size for f in root.glob("*.safetensors"))
    return {"rows": total, "shards": index["num_shards"], "written": len(todo), "bytes": written}


def _prepare_dir(root: Path, key: CacheKey, overwrite: bool) -> dict | None:
    """The index of a cache of ``key`` to finish in ``root``, or None to start one (clearing a
    different cache's files with ``overwrite``)."""
    try:
        index = _read_index(root) if root.is_dir() else None
    except StepdistillError:
        if not overwrite:
            raise
        index = {}  # an unreadable index: replaced
    if index and not overwrite:
        diff = key.differences(index)
        if not diff:
            return index
        raise StepdistillError(f"{str(root)!r} holds a cache of other {'/'.join(diff)} (made with "
                               f"{index.get('teacher')!r}): pass overwrite=true to replace it, or choose another out")
    if root.is_dir():
        ours = [root / INDEX, root / NULL, *root.glob("shard-*.safetensors"), *root.glob(".*.tmp-*")]
        others = [p for p in root.iterdir() if p not in ours]
        if others and not index:
            raise StepdistillError(f"out={str(root)!r} is not empty and holds no cache ({others[0].name}): "
                                   "choose a new or empty directory")
        for p in ours:
            if p.is_file():
                p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return None


def _new_index(root: Path, key: CacheKey, prompts: Sequence[str], encode: Callable, shard_size: int) -> dict:
    """Encode row 0 to learn the per-row shapes, choose the shard size, write ``index.json``."""
    if key.num_rows < 1 or len(prompts) != key.num_rows:
        raise StepdistillError(f"nothing to cache: {len(prompts)} prompts for {key.num_rows} rows")
    sample = encode(0, 1)
    row_bytes = sum(v[0].numel() * DTYPES[key.dtype].itemsize for v in sample.values())
    size = int(shard_size) or max(1, SHARD_BYTES // row_bytes)
    size = min(size, key.num_rows)
    index = {"format": FORMAT, "version": VERSION, **asdict(key), "shard_size": size,
             "num_shards": -(-key.num_rows // size), "row_bytes": row_bytes,
             "tensors": {k: list(v.shape[1:]) for k, v in sample.items()}, "prompts": list(prompts)}
    _atomic_text(json.dumps(index, indent=1), root / INDEX)
    return index


def _write_shard(root: Path, shard: int, start: int, stop: int, encode: Callable, batch_size: int,
                 dtype: torch.dtype, bar) -> None:
    """Encode rows [start, stop) batch by batch into preallocated tensors; save the shard atomically."""
    tensors: dict[str, Tensor] = {}
    for first in range(start, stop, int(batch_size)):
        last = min(stop, first + int(batch_size))
        for name, value in encode(first, last).items():
            if name not in tensors:
                tensors[name] = torch.empty((stop - start, *value.shape[1:]), dtype=dtype)
            tensors[name][first - start:last - start] = value.detach().to("cpu", dtype)
        if bar is not None:
            bar.update(last - first)
    _atomic_save(tensors, shard_path(root, shard), {"first_row": str(start), "num_rows": str(stop - start)})


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, initial=done, desc="caching conditioning", unit="row")


# ----------------------------------------------------------------------------- reading
class ConditioningCache:
    """A finished cache directory, read row by row (memory-mapped; nothing is loaded up front).

    Args:
        directory: the ``out`` of ``stepdistill cache``.
    """

    def __init__(self, directory: str | Path) -> None:
        self.root = Path(str(directory)).expanduser()
        index = _read_index(self.root) if self.root.is_dir() else None
        if index is None:
            raise StepdistillError(f"no conditioning cache in {str(self.root)!r} (data.cache): make it with "
                                   f"`stepdistill cache <the run's data and teacher> out={self.root}`")
        self.index = index
        missing = [s for s in range(index["num_shards"]) if not shard_path(self.root, s).is_file()]
        if missing or not (self.root / NULL).is_file():
            raise StepdistillError(f"the cache in {str(self.root)!r} is incomplete ({len(missing)} of "
                                   f"{index['num_shards']} shards missing): re-run the same `stepdistill cache` "
                                   "command to finish it (it resumes)")

    @property
    def prompts(self) -> list[str]:
        return list(self.index["prompts"])

    def __len__(self) -> int:
        return int(self.index["num_rows"])

    def check_rows(self, rows: object, what: str) -> None:
        """The data's rows must be the cached ones (``what`` names them in the message)."""
        if rows_hash(rows) != self.index["rows_hash"]:
            raise StepdistillError(f"{what} changed since the cache in {str(self.root)!r} was made "
                                   f"({self.index['num_rows']} rows then): " + _FIX.format(dir=self.root))

    def check_teacher(self, teacher: str | Path) -> None:
        """The cache must come from ``teacher``'s text encoders."""
        teacher = resolve_local_dir(teacher, "teacher")
        if encoder_fingerprint(teacher, self.index["max_sequence_length"]) != self.index["encoder_hash"]:
            raise StepdistillError(f"the cache in {str(self.root)!r} was made with the text encoders of "
                                   f"{self.index['teacher']!r}, not those of {str(teacher)!r}: "
                                   + _FIX.format(dir=self.root))

    def prompt_encoder(self, teacher: str | Path, negative_prompt: str = "") -> CachedPromptEncoder:
        """A ``PromptEncoder`` stand-in over this cache, after checking teacher and negative prompt."""
        self.check_teacher(teacher)
        if str(negative_prompt) != self.index["negative_prompt"]:
            raise StepdistillError(f"the cache in {str(self.root)!r} holds the null condition of negative_prompt="
                                   f"{self.index['negative_prompt']!r}, not {negative_prompt!r}: "
                                   + _FIX.format(dir=self.root))
        return CachedPromptEncoder(self)

    def latent_encoder(self, teacher: str | Path) -> nn.Module:
        """The stand-in for ``VaeLatents``: the identity, as the data's ``draw`` already returns the
        cached latents; checks that they come from ``teacher``'s VAE."""
        if "latents" not in self.index["tensors"]:
            raise StepdistillError(f"the cache in {str(self.root)!r} holds no image latents: "
                                   + _FIX.format(dir=self.root))
        if vae_fingerprint(teacher) != self.index["vae_hash"]:
            raise StepdistillError(f"the latents in {str(self.root)!r} come from the VAE of "
                                   f"{self.index['teacher']!r}, not of {str(teacher)!r}: " + _FIX.format(dir=self.root))
        return nn.Identity()

    def read(self, name: str, rows: Sequence[int]) -> Tensor:
        """Tensor ``name`` of ``rows`` as float32 [len(rows), ...], read row by row from the shards."""
        rows = [int(r) for r in rows]
        out = torch.empty((len(rows), *self.index["tensors"][name]), dtype=torch.float32)
        size = self.index["shard_size"]
        for shard in sorted({r // size for r in rows}):
            with safe_open(str(shard_path(self.root, shard)), framework="pt") as f:
                tensor = f.get_slice(name)
                for i, row in enumerate(rows):
                    if row // size == shard:
                        local = row - shard * size
                        out[i] = tensor[local:local + 1][0].float()
        return out

    def null(self) -> dict[str, Tensor]:
        """``null_prompt_embeds`` [1, L, D], ``null_pooled_embeds`` [1, P], ``time_ids`` [1, 6] (as stored,
        in float32)."""
        return {k: v.to(torch.float32, copy=True) for k, v in load_file(str(self.root / NULL)).items()}


class CachedPromptEncoder:
    """``PromptEncoder.encode`` for the cached prompts, from the cache: no tokenizer, no text encoder.

    Args:
        cache: the cache (checked against the teacher by ``ConditioningCache.prompt_encoder``).
    """

    def __init__(self, cache: ConditioningCache) -> None:
        self.cache = cache
        self.rows = {}
        for i, prompt in enumerate(cache.prompts):
            self.rows.setdefault(prompt, i)
        self.null = cache.null()
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> CachedPromptEncoder:
        self.device = torch.device(device)
        return self

    def encode(self, prompts: list[str] | str, negative: str = "") -> Conditioning:
        """The cached ``Conditioning`` of ``prompts`` (as ``PromptEncoder.encode``, float32)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if negative != self.cache.index["negative_prompt"]:
            raise StepdistillError(f"the cache holds the null condition of {self.cache.index['negative_prompt']!r}, "
                                   f"not {negative!r}")
        unknown = [p for p in prompts if p not in self.rows]
        if unknown:
            raise StepdistillError(f"prompt {unknown[0]!r} is not in the cache {str(self.cache.root)!r}: it holds the "
                                   "training prompts only (sampling and evaluation load the text encoders)")
        rows = [self.rows[p] for p in prompts]
        pooled = self.cache.read("pooled_embeds", rows) if "pooled_embeds" in self.cache.index["tensors"] else None
        time_ids = self.null.get("time_ids")
        cond = Conditioning(prompt_embeds=self.cache.read("prompt_embeds", rows), pooled_embeds=pooled,
                            time_ids=None if time_ids is None else time_ids.expand(len(rows), -1),
                            null_prompt_embeds=self.null["null_prompt_embeds"],
                            null_pooled_embeds=self.null.get("null_pooled_embeds"))
        return cond.to(self.device)
