"""Discriminator heads on a denoiser's features (DMD2's "diffusion GAN" classifier).

DMD2 (Yin et al. 2024, Sec. 4.3) puts a small classifier on the fake-score network's bottleneck:
repeated conv4x4-stride-2 / GroupNorm / SiLU down to 4x4, then a conv to one logit. Vector
features (toy MLPs) get an MLP; token features (transformers) are mean-pooled first.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    """Features [B, *feature_shape] -> one logit per sample [B].

    Args:
        feature_shape: [C, h, w] (conv head), [D] (MLP head) or [N, D] (pooled tokens, MLP head).
        width: hidden width (default: the feature width).
    """

    def __init__(self, feature_shape: Sequence[int], width: int | None = None) -> None:
        super().__init__()
        shape = tuple(int(v) for v in feature_shape)
        self.pool_tokens = len(shape) == 2
        if len(shape) == 3:
            self.net = _conv_head(shape, width or shape[0])
        elif len(shape) in (1, 2):
            d = shape[-1]
            w = width or d
            self.net = nn.Sequential(nn.Linear(d, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, 1))
        else:
            raise ValueError(f"unsupported feature shape {shape}; expected [C, h, w], [D] or [N, D]")

    def forward(self, features: Tensor) -> Tensor:
        if self.pool_tokens:
            features = features.mean(1)
        return self.net(features).reshape(features.shape[0])


def _conv_head(shape: tuple[int, int, int], width: int) -> nn.Sequential:
    c, h, w = shape
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
    while min(h, w) > 4:
        layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GroupNorm(_groups(width), width), nn.SiLU()]
        h, w = h // 2, w // 2
    layers.append(nn.Conv2d(width, 1, (h, w)))
    return nn.Sequential(*layers)
