"""Out-of-distribution detection: how well each per-image score tells Fashion-MNIST test images
from foreign ones, as AUROC and FPR at 95% TPR, score by score side by side (docs/ood.md).

The foreign sets are made here from what any machine with the package has (no downloads), each
`images` strong and seeded: digits drawn with Pillow's font (MNIST-like: raw bits/dim rates them
as more likely than the data), patches of scikit-image's photos, smooth images (constants,
gradients, blobs: within the data's range of bits/dim), uniform noise, and Fashion-MNIST inverted
and upside down. A control set of held-out Fashion-MNIST test images shows the noise floor
(AUROC ~0.5). The in-distribution set and the reference (the scores' validation statistics) are
disjoint parts of the test split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowmodel import Flow
from pipeline.batch.resolve import resolve_batch_model
from pipeline.bench import harness
from pipeline.bench.harness import Result, Run, Table
from pipeline.model.likelihood import predict_levels
from pipeline.model.scores import add_png_complexity, ood_score
from pipeline.tracking.connection import resolve_tracking_uri

SIDE = 28  # the sets are 28x28 grayscale, Fashion-MNIST's shape


def _digits(count: int, rng: np.random.Generator) -> np.ndarray:
    """White digits on black, drawn at twice the size and downscaled (antialiased as MNIST's):
    random digit, size, stroke, rotation and offset."""
    from PIL import Image, ImageDraw, ImageFont

    out = np.empty((count, SIDE, SIDE), np.uint8)
    for index in range(count):
        canvas = Image.new("L", (2 * SIDE, 2 * SIDE))
        font = ImageFont.load_default(size=int(rng.integers(36, 57)))
        ImageDraw.Draw(canvas).text(
            (SIDE, SIDE),
            str(rng.integers(10)),
            fill=255,
            font=font,
            anchor="mm",
            stroke_width=int(rng.integers(1, 5)),
            stroke_fill=255,
        )
        offset = tuple(int(v) for v in rng.integers(-5, 6, 2))
        canvas = canvas.rotate(float(rng.uniform(-25, 25)), Image.BILINEAR, translate=offset)
        out[index] = np.asarray(canvas.resize((SIDE, SIDE), Image.BOX))
    return out


PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass")
PHOTOS += ("gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "rocket", "text")


def _photos(count: int, rng: np.random.Generator) -> np.ndarray:
    """Square patches (32 to 160 pixels) of scikit-image's bundled photos, grayscale,
    downscaled to 28x28."""
    import skimage.data
    from PIL import Image

    pictures = [Image.fromarray(getattr(skimage.data, name)()).convert("L") for name in PHOTOS]
    out = np.empty((count, SIDE, SIDE), np.uint8)
    for index in range(count):
        picture = pictures[rng.integers(len(pictures))]
        size = int(rng.integers(32, min(161, *picture.size)))
        left, top = (int(rng.integers(0, edge - size + 1)) for edge in picture.size)
        patch = picture.crop((left, top, left + size, top + size))
        out[index] = np.asarray(patch.resize((SIDE, SIDE), Image.BOX))
    return out


def _smooth(count: int, rng: np.random.Generator) -> np.ndarray:
    """In turn: a constant level, a linear gradient at a random angle, a Gaussian blob."""
    rows, cols = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)  # (H, W) each, in [0, 1]
    out = np.empty((count, SIDE, SIDE))
    for index in range(count):
        low, high = np.sort(rng.uniform(0, 255, 2))
        kind = index % 3
        if kind == 0:
            shape = np.zeros((SIDE, SIDE))
        elif kind == 1:
            angle = rng.uniform(0, 2 * np.pi)
            shape = np.cos(angle) * cols + np.sin(angle) * rows
        else:
            centre, width = rng.uniform(0.2, 0.8, 2), rng.uniform(0.1, 0.4)
            shape = np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * width**2))
        span = shape.max() - shape.min()
        out[index] = low + (high - low) * ((shape - shape.min()) / span if span else 0.5)
    return np.rint(out).astype(np.uint8)


def _noise(count: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (count, SIDE, SIDE), dtype=np.uint8)


# name -> (builder of `count` images from a seeded generator and held-out Fashion-MNIST, what)
SETS: dict[str, tuple[Callable[[int, np.random.Generator, np.ndarray], np.ndarray], str]] = {
    "fashion (control)": (lambda n, rng, held: held[:n], "held-out Fashion-MNIST test images"),
    "digits": (lambda n, rng, held: _digits(n, rng), "digits in Pillow's font, MNIST-like"),
    "photos": (lambda n, rng, held: _photos(n, rng), "patches of scikit-image's photos"),
    "smooth": (lambda n, rng, held: _smooth(n, rng), "constants, gradients and blobs"),
    "noise": (lambda n, rng, held: _noise(n, rng), "uniform noise"),
    "inverted": (lambda n, rng, held: 255 - held[n : 2 * n], "Fashion-MNIST, 255 - x"),
    "upside down": (lambda n, rng, held: held[2 * n : 3 * n, ::-1], "Fashion-MNIST, rows flipped"),
}


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(outlier score > inlier score) + P(equal) / 2: the area under the ROC curve of the score
    as a detector of outliers (Mann-Whitney U / (n_in n_out), ties at average rank)."""
    scores = np.concatenate([inliers, outliers])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    n_in, n_out = len(inliers), len(outliers)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_95_tpr(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """The share of outliers that pass as inliers at the threshold that keeps 95% of the inliers
    (the lowest score >= 95% of them): what a flag at the 95th percentile of validation misses."""
    threshold = np.sort(inliers)[int(np.ceil(0.95 * len(inliers))) - 1]
    return float(np.mean(outliers <= threshold))


@dataclass(frozen=True)
class Parts:
    """What every score is made of, per image: bits/dim, each level's bits/dim [B, L] (the
    finest first) and the PNG complexity term, from one forward pass (`predict_levels`)."""

    bits: np.ndarray
    levels: np.ndarray
    png: np.ndarray


# name -> (score of an image set given the reference set's parts; high = unusual, source)
SCORES: dict[str, tuple[Callable[[Parts, Parts], np.ndarray], str]] = {
    "bits/dim": (lambda p, ref: p.bits, "the likelihood itself (Nalisnick et al. 2019)"),
    "complexity": (lambda p, ref: p.bits - p.png, "bits/dim - PNG bits/dim (Serra et al. 2020)"),
    "final level": (
        lambda p, ref: p.levels[:, -1],
        "the coarsest level's bits/dim (Schirrmeister et al. 2020)",
    ),
    "final - first": (
        lambda p, ref: p.levels[:, -1] - p.levels[:, 0],
        "the coarsest level's bits/dim less the finest's (after Havtorn et al. 2021)",
    ),
    "typicality": (
        lambda p, ref: np.abs(p.bits - ref.bits.mean()),
        "|bits/dim - its reference mean| (after Nalisnick et al. 2019b)",
    ),
    "typical complexity": (
        lambda p, ref: np.abs(p.bits - p.png - (ref.bits - ref.png).mean()),
        "|complexity - its reference mean|",
    ),
    "ood_score": (
        lambda p, ref: ood_score(p.bits, p.levels, p.png),
        "the default (pipeline.model.scores): complexity + final level",
    ),
}


@dataclass(frozen=True)
class Settings:
    # A local model directory, models:/<name>@<alias>, models:/<name>/<version> or runs:/...
    # (None: the preset's model at its initialisation, untrained).
    model: str | None = None
    tracking_uri: str | None = None  # of models:/ and runs:/ (None: the env's, else the work's)
    preset: str = "fashion-mnist"
    images: int = 500  # per foreign set
    in_distribution: int = 2000  # Fashion-MNIST test images scored as the inliers
    reference: int = 2000  # other test images: the typicality scores' reference
    draws: int = 1  # dequantization draws per image, as the scoring job's
    seed: int = 0  # of the foreign sets and the dequantization noise
    threads: int | None = None  # torch threads (None: one per core)


SMOKE = {"images": 24, "in_distribution": 48, "reference": 48}


def _flow(settings: Settings, run: Run) -> tuple[Flow, str]:
    """The model and its label."""
    if settings.model is None:
        model = harness.preset_config(settings.preset).model
        _, images = harness.fashion_mnist("train", 512)
        return harness.preset_flow(model, images).eval(), f"the {settings.preset} preset, untrained"
    if settings.model.startswith(("models:/", "runs:/")):
        import mlflow

        mlflow.set_tracking_uri(resolve_tracking_uri(settings.tracking_uri, run.workdir))
    resolved = resolve_batch_model(settings.model)
    return resolved.flow, f"{resolved.label} ({settings.model})"


def _separation(inliers: np.ndarray, outliers: np.ndarray) -> dict[str, float]:
    return {"auroc": auroc(inliers, outliers), "fpr95": fpr_at_95_tpr(inliers, outliers)}


def _parts(flow: Flow, images: np.ndarray, keys: list[str], settings: Settings) -> Parts:
    images = np.ascontiguousarray(images.reshape(-1, 1, SIDE, SIDE))  # (B, 1, H, W)
    log_likelihood, levels = predict_levels(flow, images, keys, settings.seed, settings.draws)
    bits = -log_likelihood / (flow.config.dims * math.log(2))
    return Parts(bits, levels, add_png_complexity({"image": images})["png_bits_per_dim"])


def measure(settings: Settings, run: Run) -> Result:
    flow, label = _flow(settings, run)
    if tuple(flow.config.image_shape) != (1, SIDE, SIDE):
        raise ValueError(
            f"ood: expected a model of Fashion-MNIST's shape [1, {SIDE}, {SIDE}], found "
            f"{list(flow.config.image_shape)}"
        )
    n, inliers, reference = settings.images, settings.in_distribution, settings.reference
    keys, test = harness.fashion_mnist("test", reference + inliers + 3 * n)
    if len(keys) < reference + inliers + 3 * n:
        raise ValueError(
            f"ood: expected reference + in_distribution + 3 x images <= {len(keys)} test images, "
            f"found {reference} + {inliers} + 3 x {n}"
        )
    images = test.numpy()
    held = images[reference + inliers :, 0]  # (3n, H, W): control, inverted, upside down
    load = [harness.load_average()]
    with harness.torch_threads(settings.threads):
        seconds, (ref, ins) = harness.timed(
            lambda: tuple(
                _parts(flow, images[a:b], keys[a:b], settings)
                for a, b in ((0, reference), (reference, reference + inliers))
            )
        )
        parts = {}
        for index, (name, (build, _)) in enumerate(SETS.items()):
            made = build(n, np.random.default_rng([settings.seed, index]), held)
            parts[name] = _parts(flow, made, [f"{name}-{i:05d}" for i in range(n)], settings)
            run.log(f"{name}: {n} images, mean bits/dim {parts[name].bits.mean():.3f}")
    load.append(harness.load_average())
    results = {
        name: {score: _separation(fn(ins, ref), fn(p, ref)) for score, (fn, _) in SCORES.items()}
        for name, p in parts.items()
    }
    foreign = [name for name in SETS if name != "fashion (control)"]
    figures: dict[str, Any] = {
        "model": label,
        "settings": {**dataclasses.asdict(settings), "load_average_during": load},
        "inliers_per_second": (reference + inliers) / seconds,
        "means": {
            name: {
                "bits_per_dim": float(p.bits.mean()),
                "png_bits_per_dim": float(p.png.mean()),
                **{f"level_{i}_bits_per_dim": float(v) for i, v in enumerate(p.levels.mean(0))},
            }
            for name, p in {"in-distribution": ins, **parts}.items()
        },
        "sets": results,
        "worst_auroc": {
            score: min(results[name][score]["auroc"] for name in foreign) for score in SCORES
        },
    }
    return Result(figures, _tables(figures, settings))


def _tables(figures: dict[str, Any], settings: Settings) -> list[Table]:
    sets, scores = figures["sets"], list(SCORES)
    about = "; ".join(f"{name}: {text}" for name, (_, text) in SETS.items())
    defined = "; ".join(f"{name}: {text}" for name, (_, text) in SCORES.items())
    load = figures["settings"]["load_average_during"]
    tables = [
        Table(
            ["set", *scores],
            [[name, *(sets[name][score][key] for score in scores)] for name in sets]
            + ([["worst foreign set", *figures["worst_auroc"].values()]] if key == "auroc" else []),
            title=f"{title}, {figures['model']}",
        )
        for key, title in (("auroc", "AUROC"), ("fpr95", "FPR at 95% TPR"))
    ]
    level_keys = [k for k in next(iter(figures["means"].values())) if k.startswith("level_")]
    levels = [k.replace("_bits_per_dim", " bits/dim").replace("_", " ") for k in level_keys]
    tables.append(
        Table(
            ["set", "bits/dim", "PNG bits/dim", *levels],
            [
                [name, m["bits_per_dim"], m["png_bits_per_dim"], *(m[k] for k in level_keys)]
                for name, m in figures["means"].items()
            ],
            [
                f"Inliers: {settings.in_distribution:,} Fashion-MNIST test images; reference (the "
                f"typicality scores' mean): {settings.reference:,} others; each set "
                f"{settings.images:,} images (seed {settings.seed}), {settings.draws} "
                f"dequantization draw(s). Higher scores are more unusual; AUROC 1 separates "
                f"perfectly, 0.5 not at all, below 0.5 ranks the set as more normal than the "
                f"data. FPR at 95% TPR: the share of a set that passes a threshold keeping 95% of "
                f"the inliers. Load average {load[0]} before scoring, {load[1]} after.",
                f"Sets: {about}.",
                f"Scores: {defined}.",
            ],
            title="Mean bits/dim per set (levels: the finest first)",
        )
    )
    return tables
