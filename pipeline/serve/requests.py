"""HTTP request bodies to the images and keys the served model scores, within limits.

    POST <prefix>/score  Content-Type: image/png | image/jpeg | image/webp | application/octet-stream
                         the encoded image; `?key=<key>` optional
    POST <prefix>/score  Content-Type: application/json
                         {"image": [[[...]]], "key": "k"}            one image, uint8 [C, H, W]
                         {"images": [[[[...]]]], "keys": ["a", ...]}  a batch, uint8 [B, C, H, W]

Encoded images are fitted to the model's shape as `flowray prepare` fits folder images (an image
already in that shape and mode passes unchanged); JSON pixels are integers 0..255. Without a key,
an image's key is a digest of its pixels, as in the MLflow model.

Limits (ServeConfig's), each answered with 413 and what was found:
- the body's bytes (max_json_bytes for JSON: a parsed number costs ~36 bytes of Python objects;
  max_image_bytes otherwise). A declared Content-Length over it is refused before the body is
  read; a chunked body is refused as soon as it passes it.
- an encoded image's pixels, from its header, before decoding: max_pixels (tighter than
  prepare's: a replica decodes several requests at once), a quarter of it for 16- and 32-bit
  modes, whose conversion to 8 bits goes through float64.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flowmodel.errors import FlowrayError
from pipeline.data.images import BadImage, ImageLimits, decode_fitted, open_image
from pipeline.model.pyfunc import as_uint8_images, image_keys
from pipeline.serve.config import ServeConfig

ENCODED_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")
JSON_TYPE = "application/json"
MAX_IMAGES_PER_REQUEST = 1024  # a bound on one request's memory and time; batches are cheap
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # converted through float64
WIDE_SHARE = 4  # such images get max_pixels / WIDE_SHARE
TOO_LARGE = 413


class BadRequest(FlowrayError, ValueError):
    """A request the server cannot score; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ScoreItem:
    image: np.ndarray  # uint8 [C, H, W]
    key: str


def media_type(content_type: str) -> str:
    """The request's media type, lower case, without parameters (BadRequest 415 for a type the
    server does not take)."""
    mime = content_type.split(";")[0].strip().lower()
    if mime == JSON_TYPE or mime in ENCODED_TYPES:
        return mime
    raise BadRequest(
        f"content type: expected {JSON_TYPE} or one of {', '.join(ENCODED_TYPES)}, "
        f"found {content_type or 'none'!r}",
        status=415,
    )


def _check_size(size: int, mime: str, config: ServeConfig, found: str) -> None:
    """BadRequest 413 when a body of `size` bytes passes the limit for `mime`; `found` says what
    was found."""
    json_body = mime == JSON_TYPE
    limit = config.max_json_bytes if json_body else config.max_image_bytes
    if size > limit:
        name = "max_json_bytes" if json_body else "max_image_bytes"
        raise BadRequest(
            f"body: expected at most {limit:,} bytes for {mime} ({name}), found {found}",
            status=TOO_LARGE,
        )


async def read_body(request: Any, mime: str, config: ServeConfig) -> bytes:
    """The body of a Starlette `request`, read chunk by chunk up to the limit for `mime`.
    BadRequest 413 when the Content-Length declares more than the limit (nothing is read) or the
    body passes it while arriving; 400 for a Content-Length that is not a number."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest(
                f"Content-Length: expected a number of bytes, found {declared!r}"
            ) from None
        _check_size(size, mime, config, f"a Content-Length of {size:,}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        _check_size(total, mime, config, f"more ({total:,} bytes received so far)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(
    body: bytes, mime: str, shape: Sequence[int], key: str | None, config: ServeConfig
) -> list[ScoreItem]:
    """The images of one request (a body `read_body` took, of a `media_type`), in the model's
    (C, H, W) `shape`, with their keys. BadRequest 413 for an image over the limits, 400 for a
    body that is not an image or not the documented JSON."""
    if mime == JSON_TYPE:
        return _from_json(body, shape)
    channels, height, width = shape
    # Pillow's own bomb check stays; the pixel limit is this server's (`_check_pixels`), checked
    # from the header before decoding; then prepare's path (`images.decode_fitted`).
    unlimited = ImageLimits(max_pixels=2**62, max_bytes=len(body) or 1)
    try:
        with open_image(body, unlimited) as header:
            _check_pixels(header.size, header.mode, config)
        image = decode_fitted(body, channels, (height, width), unlimited).pixels
    except BadImage as err:
        raise BadRequest(f"image: {err}") from err
    return [ScoreItem(image, image_keys(image[None], [key] if key else None)[0])]


def _check_pixels(size: tuple[int, int], mode: str, config: ServeConfig) -> None:
    width, height = size
    wide = mode in WIDE_MODES
    most = config.max_pixels // WIDE_SHARE if wide else config.max_pixels
    if width * height > most:
        what = f"max_pixels / {WIDE_SHARE} for mode {mode}" if wide else "max_pixels"
        raise BadRequest(
            f"image: expected at most {most:,} pixels ({what}), found {width}x{height} = "
            f"{width * height:,}: refused before decoding",
            status=TOO_LARGE,
        )


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
    try:  # a ragged list becomes an object array (refused by its dtype); numpy raises on some
        array = np.asarray(values)
    except ValueError as err:
        raise BadRequest(
            f"images: expected a rectangular array, found a ragged one ({err})"
        ) from err
    try:
        images = as_uint8_images(array, shape)
        keys = image_keys(images, keys)
    except ValueError as err:
        raise BadRequest(str(err)) from err
    return [ScoreItem(image, key) for image, key in zip(images, keys)]
