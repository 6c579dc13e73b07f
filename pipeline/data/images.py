"""Pixels: bounds checked before decoding, PNG/JPEG bytes to uint8 [C, H, W], fitting to a shape.

    limits = ImageLimits(max_pixels=50_000_000, max_bytes=32 << 20)
    image = open_image(data, limits)          # header read and checked, nothing decoded yet
    pixels = decode_image(data, (1, 28, 28))  # a shard member: checked against the split's shape
    pixels = fit_image(image, 3, (64, 64))    # any photo to the target channels and size
    fitted = decode_fitted(data, 3, (64, 64), limits)  # bytes -> checked, upright, fitted

Bad inputs are refused before any pixel is decoded: a file larger than `max_bytes`, or a header
that declares more than `max_pixels` pixels (a decompression bomb: a 15000x15000 PNG of a few
hundred KB would need 675 MB decoded). Pillow refuses headers above 2 x Image.MAX_IMAGE_PIXELS
(179M pixels) on its own, whatever `max_pixels` says; that is reported the same way. Every refusal
is a `BadImage` (a ValueError) whose message says what was found and what the limit is; the
callers' on_error policy decides whether it is skipped or stops the job.

16-bit and 32-bit greyscale images are scaled by their type's range, never by their content, so a
dark image stays dark: I;16 (and I, which Pillow gives older 16-bit PNGs) maps 0..65535 to 0..255
as round(v / 257); F is taken as 0..255 and clipped.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

_WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_WIDE_GREY_MAX = 65535  # the range of a 16-bit sample; 65535 / 257 == 255


class BadImage(ValueError):
    """An input that cannot be used as an image; the message says what and why."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one input image, checked before it is decoded.

    Attributes:
        max_pixels: most pixels (width x height) a header may declare; the default is
            8192 x 8192, far above any training image and far below a bomb.
        max_bytes: most bytes of one encoded image file (or shard member).
    """

    max_pixels: int = 8192 * 8192
    max_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError(
                f"image limits: expected positive numbers, found max_pixels={self.max_pixels}, "
                f"max_bytes={self.max_bytes}"
            )

    def check_bytes(self, size: int) -> None:
        if size > self.max_bytes:
            raise BadImage(
                f"file of {size:,} bytes is larger than the limit of {self.max_bytes:,} bytes "
                "(max_bytes)"
            )


def open_image(data: bytes, limits: ImageLimits | None = None) -> PILImage.Image:
    """`data` opened by Pillow with only its header read, checked against `limits` (BadImage:
    too many bytes, not an image, or a header declaring too many pixels)."""
    from PIL import Image

    limits = limits or ImageLimits()
    limits.check_bytes(len(data))
    try:
        # A PNG is tried as PNG alone: the other formats' probes cost more than its decoding.
        formats = ("PNG",) if data.startswith(_PNG_SIGNATURE) else None
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(found[1]):,} pixels" if found else "more pixels"
        raise BadImage(
            f"image of {pixels} is larger than Pillow's limit of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels (a decompression bomb): refused "
            "before decoding"
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"cannot decode image: {err}") from err
    width, height = image.size
    if width * height > limits.max_pixels:
        image.close()
        raise BadImage(
            f"image of {width}x{height} = {width * height:,} pixels is larger than the limit of "
            f"{limits.max_pixels:,} pixels (max_pixels): refused before decoding"
        )
    return image


def decode_image(
    data: bytes, shape: tuple[int, int, int], limits: ImageLimits | None = None
) -> np.ndarray:
    """PNG bytes as uint8 [C, H, W], checked against `shape` (mode L for C=1, RGB for C=3)
    from the header, before decoding: a member of the wrong size (a bomb among them) costs no
    memory. BadImage when the bytes are not an image, break `limits` or differ from `shape`."""
    channels, height, width = shape
    want_mode = "L" if channels == 1 else "RGB"
    with open_image(data, limits) as image:
        if image.mode != want_mode:
            raise BadImage(
                f"image mode {image.mode}, expected {want_mode} for {channels} channel(s)"
            )
        if image.size != (width, height):
            found_width, found_height = image.size
            raise BadImage(
                f"image size {found_height}x{found_width}, expected {height}x{width} (HxW)"
            )
        try:
            pixels = image.tobytes()
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"cannot decode image: {err}") from err
    if channels == 1:  # (1, H, W) as it comes: no transpose
        return np.frombuffer(pixels, np.uint8).reshape(shape).copy()
    return _chw(np.frombuffer(pixels, np.uint8).reshape(height, width, channels))


def _chw(array: np.ndarray) -> np.ndarray:
    """A uint8 (H, W) or (H, W, C) array as a contiguous (C, H, W) copy."""
    if array.ndim == 2:
        return array[None].copy()  # (H, W) -> (1, H, W)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (H, W, C) -> (C, H, W)


def _to_mode(image: PILImage.Image, channels: int) -> PILImage.Image:
    from PIL import Image

    if image.mode in _WIDE_GREY or image.mode == "F":
        # Pillow's convert("L") clips at 255; scale by the type's range instead (not by the
        # image's own maximum, which would brighten dark images).
        array = np.asarray(image).astype(np.float64)
        if image.mode in _WIDE_GREY:
            array = array * (255.0 / _WIDE_GREY_MAX)  # v / 257
        image = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        # Transparent pixels often hold black; composite over white like a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def fit_image(image: PILImage.Image, channels: int, size: tuple[int, int]) -> np.ndarray:
    """`image` as uint8 [C, H, W]: target channels, centre-cropped and resized to size=(H, W)."""
    from PIL import Image, ImageOps

    if channels not in (1, 3):
        raise ValueError(f"channels: expected 1 or 3, found {channels}")
    image = _to_mode(image, channels)
    height, width = size
    if image.size != (width, height):
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    return _chw(np.asarray(image, dtype=np.uint8))


def fit_array(hwc: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """A uint8 [H, W, C] array as uint8 [C, H, W] in the target shape (PIL only when needed)."""
    from PIL import Image

    height, width, have = hwc.shape
    if have == channels and (height, width) == tuple(size):
        return _chw(hwc)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[have]
    pixels = hwc[:, :, 0] if have == 1 else hwc
    return fit_image(Image.fromarray(np.ascontiguousarray(pixels), mode), channels, size)


@dataclass(frozen=True)
class FittedImage:
    """An encoded image decoded and fitted: `pixels` uint8 [C, H, W]; `width` x `height` is its
    size before fitting (upright, after the EXIF orientation)."""

    pixels: np.ndarray
    width: int
    height: int


def decode_fitted(
    data: bytes, channels: int, size: tuple[int, int], limits: ImageLimits | None = None
) -> FittedImage:
    """Encoded bytes (JPEG, PNG, WebP, ...) as a `FittedImage`: limits checked from the header
    before decoding, turned upright by its EXIF orientation, then `fit_image`. The one path of
    every encoded input (folder files, foreign shard members), so the same bytes give the same
    pixels whichever way they are read. BadImage: over the limits, not an image, or corrupt."""
    from PIL import ImageOps

    with open_image(data, limits) as image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            width, height = upright.size
            return FittedImage(fit_image(upright, channels, size), width, height)
        except (OSError, ValueError, SyntaxError) as err:
            # Pillow raises these for truncated or corrupt image data.
            raise BadImage(f"cannot decode image: {err}") from err


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) as PNG bytes (mode L or RGB)."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected uint8 [C, H, W] with C in 1, 3; found {image.dtype} {image.shape}"
        )
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (H, W[, C])
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
