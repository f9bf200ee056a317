"""Pictures and tables for people: sample grids, metric-vs-NFE plots, markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` (dicts) in ``columns`` order; floats with 4 significant digits."""
    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_metric_vs_nfe(curves: dict[str, tuple[Sequence[float], Sequence[float]]], metric: str,
                       path: Path, reference: float | None = None, title: str = "") -> None:
    """One line per curve (name -> (nfe, values)), log-x, an optional reference level."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (nfe, values) in curves.items():
        style = "o-" if len(nfe) > 1 else "*"
        ax.plot(nfe, values, style, label=name, markersize=6 if len(nfe) > 1 else 14)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--", label="reference (true vs true)")
    ax.set_xscale("log")
    values = [v for _, vs in curves.values() for v in vs]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # FID spans orders of magnitude between 1 and 50 steps
    ax.set_xlabel("NFE per sample")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_grid(rows: dict[str, Tensor], labels: Tensor, path: Path, per_row: int = 10) -> None:
    """A grid of [N, 1, H, W] images in [-1, 1]: one row per entry of ``rows``, first sample of
    each of the first ``per_row`` classes (or the first samples when classes repeat less)."""
    plt = pyplot()
    picks = _first_of_each_class(labels, per_row)
    fig, axes = plt.subplots(len(rows), len(picks), figsize=(len(picks) * 0.8, len(rows) * 0.9),
                             squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c, i in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(((images[i, 0].float().clamp(-1, 1) + 1) / 2).cpu(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(str(int(labels[i])), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scatter_panels(rows: dict[str, Tensor], labels: Tensor, path: Path, centers: Tensor | None = None,
                   max_points: int = 2000) -> None:
    """One scatter panel of 2-D samples per entry of ``rows``, coloured by class."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows), 2.8), squeeze=False)
    for ax, (name, x) in zip(axes[0], rows.items(), strict=True):
        x = x[:max_points].float().cpu()
        ax.scatter(x[:, 0], x[:, 1], c=labels[:max_points].cpu(), s=2, cmap="tab10", vmin=0, vmax=9)
        if centers is not None:
            ax.scatter(centers[:, 0], centers[:, 1], marker="x", c="black", s=20)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(losses: Sequence[float], path: Path, title: str = "training loss", smooth: int = 50) -> None:
    """The raw loss (faint) and its running mean."""
    plt = pyplot()
    y = torch.tensor(list(losses), dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.plot(y.numpy(), alpha=0.3, linewidth=0.7)
    if len(y) >= smooth:
        kernel = torch.ones(smooth, dtype=torch.float64) / smooth
        ax.plot(range(smooth - 1, len(y)), torch.conv1d(y[None, None], kernel[None, None])[0, 0].numpy())
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _first_of_each_class(labels: Tensor, k: int) -> list[int]:
    picks, seen = [], set()
    for i, c in enumerate(labels.tolist()):
        if c not in seen:
            seen.add(c)
            picks.append(i)
        if len(picks) == k:
            break
    order = sorted(picks, key=lambda i: int(labels[i]))
    return order if len(order) >= min(k, len(labels)) else list(range(min(k, len(labels))))
