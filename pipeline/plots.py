"""Pictures users look at: sample grids and bits/dim curves, as PNG bytes. Matplotlib's Agg
backend only (no display needed); every figure has a title, axis labels and units."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["image_grid", "png_bytes", "titled_grid_png", "training_curves"]


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


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """An RGB or gray uint8 image as PNG bytes, upscaled by `scale` with nearest neighbour."""
    from PIL import Image

    picture = Image.fromarray(image)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def titled_grid_png(panels: Sequence[tuple[str, np.ndarray]], suptitle: str) -> bytes:
    """Several image grids side by side, each with its title (e.g. one per temperature)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train (batch mean)", alpha=0.6)
    if validation:
        ax.plot(*zip(*validation), "o-", label="validation (whole split)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("bits per dimension")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_png(fig)


def _figure_png(fig: object) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(buffer, format="png", dpi=110)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return buffer.getvalue()
