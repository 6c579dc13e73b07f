"""Image sources as prepare reads them: bombs and oversized files are bad inputs (skipped and
reported, or a clear error), storage faults are not, and 16-bit images keep their brightness."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main as flowray
from pipeline.data.images import ImageLimits, fit_image
from pipeline.data.reader import iter_input
from pipeline.data.shards import load_manifest, prepare
from pipeline.data.sources import FolderSource
from pipeline.data.streams import RetryPolicy
from pipeline.storage import StorageConfig, join_url, put_file_atomic
from tests.faults.s3_proxy import FaultPlan


def bomb_png(path: Path, side: int = 15000) -> Path:
    """A real side x side 8-bit greyscale PNG of a few hundred KB: rows of zeros deflate ~1000:1,
    and decoding it would take side**2 bytes (225 MB at 15000)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte, then the row's pixels
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def folder_with_bomb(tmp_path) -> Path:
    """20 good RGB PNGs and one 15000x15000 PNG bomb, sorted in the middle of them."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img-{i:02d}.png")
    bomb = bomb_png(root / "img-10-bomb.png")
    assert bomb.stat().st_size < 500_000  # a few hundred KB on disk
    return root


def test_prepare_skip_leaves_a_decompression_bomb_out_and_reports_it(
    folder_with_bomb, tmp_path, capsys, caplog
):
    """A decompression bomb among folder images is a bad input, not a Pillow traceback."""
    out = tmp_path / "shards"
    argv = ["prepare", "--source", f"folder:{folder_with_bomb}", "--output", str(out)]
    argv += ["--size", "16x16", "--on-error", "skip"]
    with caplog.at_level(logging.WARNING):
        code = flowray(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = load_manifest(str(out / "train"))
    assert (manifest.count, manifest.skipped_inputs) == (20, 1)
    assert "1 bad inputs skipped" in captured.out
    (line,) = [m for m in caplog.messages if "img-10-bomb.png" in m]
    assert "225,000,000 pixels" in line and "refused before decoding" in line
    assert len(list(iter_input(str(out / "train"), shape=(3, 16, 16)))) == 20


def test_prepare_fail_stops_at_the_bomb_with_a_clear_error(folder_with_bomb, tmp_path, capsys):
    argv = ["prepare", "--source", f"folder:{folder_with_bomb}", "--output", str(tmp_path / "o")]
    code = flowray([*argv, "--size", "16x16", "--on-error", "fail"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "img-10-bomb.png" in err and "225,000,000 pixels" in err and "Traceback" not in err


def test_pixel_and_byte_limits_are_configurable_and_checked_before_decoding(folder_with_bomb):
    # 40x30 = 1,200 pixels per good image; the PNGs are ~3.6 KB each.
    source = FolderSource(
        str(folder_with_bomb), channels=3, size=(16, 16), limits=ImageLimits(max_pixels=1000)
    )
    items = list(source.read("train", range(21)))
    assert all(i.image is None for i in items)
    assert "1,200 pixels is larger than the limit of 1,000 pixels" in items[0].error
    small = FolderSource(
        str(folder_with_bomb), channels=3, size=(16, 16), limits=ImageLimits(max_bytes=100_000)
    )
    errors = {i.key: i.error for i in small.read("train", range(21)) if i.error}
    (name,) = errors
    assert name == "img-10-bomb.png" and "bytes is larger than the limit of 100,000" in errors[name]
    with pytest.raises(ValueError, match="expected positive numbers"):
        ImageLimits(max_pixels=0)


def test_other_limits_are_other_settings_for_a_rerun(folder_with_bomb, tmp_path):
    from pipeline.data.shards import PrepareError

    out = str(tmp_path / "o")
    prepare(FolderSource(str(folder_with_bomb), size=(8, 8)), out, on_error="skip")
    strict = FolderSource(str(folder_with_bomb), size=(8, 8), limits=ImageLimits(max_pixels=10))
    with pytest.raises(PrepareError, match="prepared with other settings"):
        prepare(strict, out, on_error="skip")


def test_a_storage_fault_reading_a_folder_image_is_retried_not_a_bad_input(
    folder_with_bomb, faulty_s3, tmp_path
):
    """An S3 fault while fetching an image is retried, never 'cannot decode image' with a good
    image left out."""
    direct = faulty_s3.direct
    folder = join_url(direct.url, "photos")
    for path in sorted(folder_with_bomb.glob("img-0*.png")):  # 10 good images
        put_file_atomic(str(path), join_url(folder, path.name), direct.storage)
    # Longer than s3fs and botocore retry on their own: only the source's retries can save it.
    faulty_s3.proxy.set_plan(FaultPlan(script={"img-03.png": ("500",) * 8}))
    storage = StorageConfig(endpoint_url=faulty_s3.bucket.endpoint_url, region="us-east-1")
    fast = RetryPolicy(attempts=6, base_delay_s=0.01, max_delay_s=0.05)
    source = FolderSource(folder, storage, size=(16, 16), retry=fast)
    result = prepare(source, str(tmp_path / "o"), on_error="skip")
    assert faulty_s3.proxy.counts["500"] == 8
    manifest = result.splits["train"].manifest
    assert (manifest.count, manifest.skipped_inputs) == (10, 0)


def test_16_bit_images_are_scaled_by_their_range_not_their_content(tmp_path):
    """A dark 16-bit image (max 200 of 65535) stays dark: scaled by the type's range, not only
    when its maximum exceeds 255 (which would keep 200 as 200, bright)."""
    dark = np.array([[0, 100, 128, 129, 200]], dtype=np.uint16)
    bright = np.array([[0, 257, 1000, 32768, 65535]], dtype=np.uint16)
    for values, want in ((dark, [0, 0, 0, 1, 1]), (bright, [0, 1, 4, 128, 255])):
        image = Image.fromarray(values)
        assert image.mode == "I;16"
        np.testing.assert_array_equal(fit_image(image, 1, (1, 5))[0, 0], want)
        # The same through a 16-bit PNG file, as a folder source reads it, and as mode "I"
        # (32-bit), which older Pillows give 16-bit PNGs.
        Image.fromarray(values).save(tmp_path / "grey16.png")
        with Image.open(tmp_path / "grey16.png") as png:
            np.testing.assert_array_equal(fit_image(png, 1, (1, 5))[0, 0], want)
        wide = Image.fromarray(values.astype(np.int32), "I")
        np.testing.assert_array_equal(fit_image(wide, 1, (1, 5))[0, 0], want)
