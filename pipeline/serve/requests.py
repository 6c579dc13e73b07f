"""HTTP request bodies to the images and keys the served model scores.

    POST <prefix>/score  Content-Type: image/png | image/jpeg | image/webp | application/octet-stream
                         the encoded image; `?key=<key>` optional
    POST <prefix>/score  Content-Type: application/json
                         {"image": [[[...]]], "key": "k"}            one image, uint8 [C, H, W]
                         {"images": [[[[...]]]], "keys": ["a", ...]}  a batch, uint8 [B, C, H, W]

Encoded images of another size or mode are fitted to the model's shape the way `flowray prepare`
fits folder images (EXIF orientation, channels, centre crop, resize); an image already in the
model's shape and mode passes unchanged, so its pixels are the ones a score job decodes. JSON
pixels are integers 0..255 of any width (pipeline.model.pyfunc.as_uint8_images). Without a key,
an image's key is a digest of its pixels (pipeline.model.pyfunc.content_key), as in the MLflow
model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.images import BadImage, ImageLimits, fit_image, open_image
from pipeline.errors import FlowrayError
from pipeline.model.pyfunc import as_uint8_images, image_keys

__all__ = ["BadRequest", "ScoreItem", "decode_fitted", "parse_request"]

ENCODED_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
MAX_IMAGES_PER_REQUEST = 1024  # a bound on one request's memory and time; batches are cheap


class BadRequest(FlowrayError, ValueError):
    """A request the server cannot score; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ScoreItem:
    image: np.ndarray  # uint8 [C, H, W]
    key: str


def parse_request(
    body: bytes,
    content_type: str,
    shape: Sequence[int],
    key: str | None = None,
    limits: ImageLimits | None = None,
) -> list[ScoreItem]:
    """The images of one request, in the model's (C, H, W) `shape`, with their keys.

    Raises:
        BadRequest: 415 for an unsupported content type, 400 for a body that is not an image or
            not the documented JSON (the message says what was expected and what was found).
    """
    mime = content_type.split(";")[0].strip().lower()
    if mime == "application/json":
        return _from_json(body, shape)
    if mime in ENCODED_TYPES:
        image = decode_fitted(body, shape, limits)
        return [ScoreItem(image, image_keys(image[None], [key] if key else None)[0])]
    raise BadRequest(
        f"content type: expected application/json or one of {', '.join(ENCODED_TYPES)}, "
        f"found {content_type or 'none'!r}",
        status=415,
    )


def decode_fitted(
    data: bytes, shape: Sequence[int], limits: ImageLimits | None = None
) -> np.ndarray:
    """Encoded image bytes as uint8 [C, H, W] in `shape` (see the module docstring)."""
    from PIL import ImageOps

    channels, height, width = shape
    try:
        with open_image(data, limits) as image:  # bounds checked before decoding
            image.load()
            return fit_image(ImageOps.exif_transpose(image), channels, (height, width))
    except BadImage as err:
        raise BadRequest(f"image: {err}") from err
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's truncated or corrupt data
        raise BadRequest(f"image: cannot decode image: {err}") from err


def _from_json(body: bytes, shape: Sequence[int]) -> list[ScoreItem]:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"body: expected JSON, found bytes that do not parse ({err})") from err
    if not isinstance(document, dict) or not ({"image", "images"} & set(document)):
        found = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise BadRequest(
            f'body: expected {{"image": [C][H][W], "key"?}} or {{"images": [B][C][H][W], '
            f'"keys"?}}, found {found}'
        )
    if "image" in document:
        values: Any = [document["image"]]
        keys = [document["key"]] if document.get("key") is not None else None
    else:
        values, keys = document["images"], document.get("keys")
    if isinstance(values, list) and len(values) > MAX_IMAGES_PER_REQUEST:
        raise BadRequest(
            f"images: expected at most {MAX_IMAGES_PER_REQUEST} per request, found {len(values)}"
        )
    try:
        images = as_uint8_images(_array(values), shape)
        keys = image_keys(images, keys)
    except ValueError as err:
        raise BadRequest(str(err)) from err
    return [ScoreItem(image, key) for image, key in zip(images, keys)]


def _array(values: Any) -> np.ndarray:
    # A ragged list becomes an object array (refused by its dtype); numpy raises on some.
    try:
        return np.asarray(values)
    except ValueError as err:
        raise BadRequest(
            f"images: expected a rectangular array, found a ragged one ({err})"
        ) from err
