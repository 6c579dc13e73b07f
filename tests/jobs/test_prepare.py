"""`flowray prepare`: the CLI writes shards, reruns write nothing, and user errors are one line + hint."""

from __future__ import annotations

import argparse
import socket

import numpy as np
import pytest

from jobs.cli import main as flowray
from jobs.prepare import build_parser, main
from pipeline.data.reader import iter_input
from pipeline.data.shards import load_manifest
from pipeline.storage import join_url


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prepare_fashion_mnist_then_rerun_writes_nothing(fashion_mnist_dir, tmp_path, capsys):
    argv = ["--source", f"idx:{fashion_mnist_dir}", "--output", str(tmp_path / "data")]
    argv += ["--limit", "300", "--shard-samples", "100"]
    code, out, err = _run(capsys, argv)
    assert code == 0, err
    assert "splits: train=60000, test=10000; image shape [1, 28, 28]" in out
    assert "train: 300 images [1, 28, 28] in 3 shards (3 written, 0 already complete)" in out
    assert load_manifest(str(tmp_path / "data" / "test")).count == 300
    code, out, _ = _run(capsys, argv)
    assert code == 0
    assert "train: 300 images [1, 28, 28] in 3 shards (0 written, 3 already complete), " in out
    assert "manifest unchanged" in out and " written:" not in out


def test_flowray_cli_dispatches_prepare_with_a_folder_source(photo_folder, tmp_path, capsys):
    out_dir = tmp_path / "shards"
    code = flowray(
        [
            "prepare",
            "--source",
            f"folder:{photo_folder}",
            "--output",
            str(out_dir),
            "--size",
            "24x24",
        ]
        + ["--channels", "1", "--val-fraction", "0.25", "--shard-samples", "5"]
    )
    assert code == 0, capsys.readouterr().err
    train, val = load_manifest(str(out_dir / "train")), load_manifest(str(out_dir / "val"))
    assert (train.count, val.count) == (14, 4)  # 18 images; round(4.5) == 4
    assert train.shape == val.shape == (1, 24, 24)
    assert train.classes == ("astronaut", "chelsea", "coffee")
    rows = list(iter_input(str(out_dir / "val"), shape=(1, 24, 24)))
    assert {r["image"].shape for r in rows} == {(1, 24, 24)} and all(r["label"] >= 0 for r in rows)


def test_prepare_npy_to_s3_and_back(tmp_path, s3, capsys):
    images = np.random.default_rng(1).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    out = join_url(s3.url, "npy")
    code, _, err = _run(
        capsys,
        ["--source", f"npy:{tmp_path}/x.npy", "--output", out, "--endpoint-url", s3.endpoint_url]
        + ["--shard-samples", "16"],
    )
    assert code == 0, err
    rows = list(iter_input(join_url(out, "train"), s3.storage, shape=(3, 16, 16)))
    assert len(rows) == 40 and all(r["label"] == -1 for r in rows)
    np.testing.assert_array_equal(
        np.stack([r["image"] for r in rows]), images.transpose(0, 3, 1, 2)
    )


def _assert_user_error(err: str, message: str, hint: str) -> None:
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[0].startswith("flowray prepare: error: ") and message in lines[0]
    assert lines[1].startswith("hint: ") and hint in lines[1]


def test_missing_dataset_folder_is_one_line_and_a_hint(tmp_path, capsys):
    code, _, err = _run(capsys, ["--source", f"idx:{tmp_path}/nowhere", "--output", str(tmp_path)])
    assert code == 2
    _assert_user_error(err, f"IDX folder not found: {tmp_path}/nowhere", "dataset-fashion-mnist")


def test_folder_without_idx_files_names_the_missing_file(tmp_path, capsys):
    code, _, err = _run(capsys, ["--source", f"idx:{tmp_path}", "--output", str(tmp_path / "o")])
    assert code == 2
    _assert_user_error(err, "no train*images-idx3* file in", "FASHION_MNIST_DIR")


def test_folder_source_without_size_asks_for_it(photo_folder, tmp_path, capsys):
    code, _, err = _run(capsys, ["--source", f"folder:{photo_folder}", "--output", str(tmp_path)])
    assert code == 2
    _assert_user_error(err, "a target size is needed", "--size HxW")


def test_unreachable_s3_endpoint_is_one_line_and_a_hint(tmp_path, capsys, aws_credentials):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    code, _, err = _run(capsys, ["--output", "s3://bucket/x", "--endpoint-url", endpoint])
    assert code == 1  # storage down: a runtime failure (a wrong URL or no credentials: 2)
    _assert_user_error(err, f"S3 endpoint {endpoint} is unreachable", "--endpoint-url")


def test_missing_credentials_are_one_line_and_a_hint(s3, monkeypatch, capsys):
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    code, _, err = _run(
        capsys, ["--output", join_url(s3.url, "x"), "--endpoint-url", s3.endpoint_url]
    )
    s3fs.S3FileSystem.clear_instance_cache()
    assert code == 2
    _assert_user_error(err, "no AWS credentials found", "AWS_ACCESS_KEY_ID")
    assert "flowray-test-secret" not in err


def test_missing_bucket_is_one_line_and_a_hint(s3, capsys):
    code, _, err = _run(
        capsys, ["--output", "s3://absent-bucket/x", "--endpoint-url", s3.endpoint_url]
    )
    assert code == 2
    _assert_user_error(err, "bucket 'absent-bucket' does not exist", "create it")


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [
        ("--shard-samples", "10000"),
        ("--shard-bytes", "256MiB"),
        ("--tasks", "0"),
        ("--on-error", "fail"),
        ("--val-fraction", "0.0"),
    ]:
        assert option in text and f"(default: {default})" in text
    shown = [a for a in build_parser()._actions if a.help != argparse.SUPPRESS]
    assert text.count("(default:") == len(shown) - 2  # all but --help and the required --output
    assert "--output OUTPUT where the splits go" in text and "(required unless in --config)" in text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("--size=64", "expected HxW such as 64x64, found '64'"),
        ("--shard-bytes=lots", "expected a size such as 256MiB or 100MB, found 'lots'"),
        ("--shard-samples=0", "shard_samples: expected >= 1, found 0"),
    ],
)
def test_bad_option_values_are_usage_errors(value, message, tmp_path, capsys):
    assert main(["--output", str(tmp_path / "x"), value]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_config_file_gives_the_options_and_flags_win(fashion_mnist_dir, tmp_path, capsys):
    config = tmp_path / "prepare.yaml"
    config.write_text(
        f"source: idx:{fashion_mnist_dir}\noutput: {tmp_path / 'data'}\nlimit: 50\n"
        "splits: test\nshard_samples: 20\n"
    )
    code, out, err = _run(capsys, ["--config", str(config), "--set", "limit=40", "--limit", "30"])
    assert code == 0, err
    assert load_manifest(str(tmp_path / "data" / "test")).count == 30
    assert "test: 30 images [1, 28, 28] in 2 shards" in out
    assert not (tmp_path / "data" / "train").exists()


def _bomb_png(side: int = 15000) -> bytes:
    """A real side x side greyscale PNG of a few hundred KB (all zeros compress ~1000:1)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + zeros
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


@pytest.fixture
def folder_with_a_bomb(tmp_path):
    """20 good PNGs (ten 32x32, ten 48x48) and one 15000x15000 PNG of a few hundred KB, in one
    class folder."""
    from PIL import Image

    folder = tmp_path / "photos" / "things"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        side = 32 if i < 10 else 48
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"good-{i:02d}.png")
    (folder / "bomb.png").write_bytes(_bomb_png())
    return tmp_path / "photos"


def test_a_decompression_bomb_is_skipped_and_counted_under_skip(
    folder_with_a_bomb, tmp_path, capsys
):
    argv = ["--source", f"folder:{folder_with_a_bomb}", "--output", str(tmp_path / "data")]
    code, out, err = _run(capsys, [*argv, "--size", "32x32", "--on-error", "skip"])
    assert code == 0, err
    assert "train: 20 images [3, 32, 32]" in out and "1 bad inputs skipped" in out
    assert load_manifest(str(tmp_path / "data" / "train")).skipped_inputs == 1
    assert "Traceback" not in err


def test_image_limits_are_options_checked_before_decoding(folder_with_a_bomb, tmp_path, capsys):
    base = ["--source", f"folder:{folder_with_a_bomb}", "--size", "32x32"]
    # Between 32x32 (1,024 pixels) and 48x48 (2,304): the ten 48x48 images are refused too.
    code, out, err = _run(
        capsys,
        [
            *base,
            "--output",
            str(tmp_path / "a"),
            "--on-error",
            "skip",
            "--max-image-pixels",
            "2000",
        ],
    )
    assert code == 0, err
    assert "train: 10 images [3, 32, 32]" in out and "11 bad inputs skipped" in out
    # A byte limit below the bomb's few hundred KB refuses it by its size, under fail: one line.
    code, _, err = _run(
        capsys, [*base, "--output", str(tmp_path / "b"), "--max-image-bytes", "100KB"]
    )
    assert code == 2
    _assert_user_error(err, "bomb.png", "")
    assert "larger than the limit of 100,000 bytes" in err
