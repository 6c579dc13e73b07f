"""Pictures users look at: sample grids and bits/dim curves, as PNG bytes. Matplotlib's Agg
backend only (no display needed); every figure has a title, axis labels and units."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] (C = 1 or 3) -> one uint8 image [rows*(H+pad)+pad, ..., 3] (RGB)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected uint8 [N, 1 or 3, H, W], found {list(images.shape)}")
    n, c, h, w = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        tile = np.repeat(image, 3, axis=0) if c == 1 else image  # (3, H, W)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = tile.transpose(1, 2, 0)
    return grid


def titled_grid_png(panels: Sequence[tuple[str, np.ndarray]], suptitle: str) -> bytes:
    """Several image grids side by side, each with its title (e.g. one per temperature)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (title, grid) in zip(axes[0], panels):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle(suptitle)
    return _figure_png(fig)


def training_curves(
    train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]], title: str
) -> bytes:
    """Train and validation bits/dim against step, as PNG bytes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train (batch mean)", alpha=0.6)
    if validation:
        ax.plot(*zip(*validation), "o-", label="validation (whole split)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per dimension")
    return _axes_png(fig, ax, title)


def bits_per_dim_histogram(
    counts: Sequence[int] | np.ndarray,
    edges: Sequence[float] | np.ndarray,
    title: str,
    markers: dict[str, float] | None = None,
) -> bytes:
    """A histogram of per-image bits/dim from precomputed bin counts (len(edges) = len(counts) + 1),
    with optional labelled vertical lines (e.g. {"median": 3.1, "p99": 4.2}), as PNG bytes."""
    plt = _pyplot()
    counts, edges = np.asarray(counts), np.asarray(edges, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.stairs(counts, edges, fill=True, alpha=0.7, label=f"{int(counts.sum()):,} images")
    for i, (name, value) in enumerate((markers or {}).items()):
        ax.axvline(value, color=f"C{i + 1}", linestyle="--", label=f"{name} {value:.3f}")
    ax.set_xlabel("bits per dimension (lower = more likely)")
    ax.set_ylabel("images per bin")
    return _axes_png(fig, ax, title)


def score_histograms(
    series: dict[str, np.ndarray],
    title: str,
    xlabel: str,
    markers: dict[str, float] | None = None,
    bins: int = 60,
) -> bytes:
    """Histograms of several samples of one score (e.g. a drop over the validation split) on
    shared bins, each normalised to a density so samples of any size compare; non-finite values
    are left out (counted in the legend). As PNG bytes."""
    plt = _pyplot()
    finite = {name: np.asarray(v, dtype=float) for name, v in series.items()}
    finite = {name: v[np.isfinite(v)] for name, v in finite.items()}
    values = np.concatenate([v for v in finite.values() if len(v)] or [np.zeros(1)])
    edges = np.histogram_bin_edges(values, bins=bins)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, v in finite.items():
        left_out = len(series[name]) - len(v)
        label = f"{name} ({len(v):,} images" + (f", {left_out:,} non-finite)" if left_out else ")")
        ax.hist(v, bins=edges, density=True, alpha=0.5, label=label)
    for i, (name, value) in enumerate((markers or {}).items()):
        ax.axvline(value, color=f"C{i + 2}", linestyle="--", label=f"{name} {value:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density (share of images per unit)")
    return _axes_png(fig, ax, title)


def captioned_images_png(
    images: np.ndarray, captions: Sequence[str], title: str, columns: int = 8
) -> bytes:
    """uint8 [N, C, H, W] images (C = 1 or 3) in a grid, each with its caption, as PNG bytes."""
    plt = _pyplot()
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(captions) != len(images):
        raise ValueError(
            f"images: expected uint8 [N, 1 or 3, H, W] and N captions, found "
            f"{list(images.shape)} and {len(captions)} captions"
        )
    n = max(1, len(images))
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.5 * columns, 1.7 * rows + 0.6), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        tile = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W[, 3])
        ax.imshow(tile, cmap="gray" if image.shape[0] == 1 else None, vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title)
    return _figure_png(fig)


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _axes_png(fig: Any, ax: Any, title: str) -> bytes:
    """A one-axes figure finished in the house style (title, light grid, legend), as PNG."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_png(fig)


def _figure_png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
