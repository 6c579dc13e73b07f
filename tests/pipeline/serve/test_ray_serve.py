"""Online scoring on Ray Serve, on loopback: a PNG or JSON image gets the bits/dim,
log-likelihood and OOD score `flowray score` wrote for it; images of concurrent requests share
forward passes; bad requests get a 4xx saying what was expected; and when the registry alias
moves, the deployment serves the new version without a restart."""

from __future__ import annotations

import io
import json
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pytest
import torch

from pipeline.data.images import decode_fitted
from pipeline.serve.config import ServeConfig
from pipeline.serve.runner import ServingInfo, start, stop
from tests.pipeline.flow_fixtures import MODEL_NAME, TrainedModel
from tests.pipeline.serve.conftest import ScoredImages, free_port

RELOADED_NAME = "serve-reload"  # its own registered model: moving its alias touches no other test
RELOAD_TIMEOUT_S = 120


def request(url: str, body: bytes, content_type: str, timeout: float = 60) -> tuple[int, dict]:
    message = urllib.request.Request(url, body, {"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(message, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def serving(trained_model: TrainedModel, scored_images: ScoredImages) -> Iterator[ServingInfo]:
    from pipeline.tracking.registry import register_flow

    mlflow.set_tracking_uri(trained_model.tracking_uri)
    register_flow(f"models:/{MODEL_NAME}/1", RELOADED_NAME, 4.0)  # v1, champion
    config = ServeConfig(
        model=f"models:/{RELOADED_NAME}@champion",
        tracking_uri=trained_model.tracking_uri,
        port=free_port(),
        app_name="flowray-test",
        max_batch_size=8,
        batch_wait_ms=20,
        reload_interval_s=0.5,
        cpus_per_replica=0.5,  # the session's local Ray has 2 CPUs
    )
    info = start(config)
    try:
        yield info
    finally:
        stop(config, shutdown=True)


def test_health_names_the_served_version(serving: ServingInfo) -> None:
    assert (serving.name, serving.version, serving.image_shape) == (RELOADED_NAME, "1", (1, 28, 28))
    health = get(f"{serving.url}/health")
    assert health["reference"] == f"models:/{RELOADED_NAME}@champion"


def assert_matches_score(prediction: dict, scored: ScoredImages, key: str) -> None:
    row = scored.rows.loc[key]
    assert prediction["key"] == key
    for column in ("bits_per_dim", "png_bits_per_dim", "ood_score"):
        assert prediction[column] == pytest.approx(row[column], abs=1e-5), column
    assert prediction["log_likelihood"] == pytest.approx(row["log_likelihood"], abs=1e-2)


def test_png_bytes_get_what_flowray_score_wrote_for_the_image(
    serving: ServingInfo, scored_images: ScoredImages
) -> None:
    def post_png(i: int) -> tuple[int, dict]:
        key = scored_images.keys[i]
        return request(f"{serving.url}/score?key={key}", scored_images.pngs[i], "image/png")

    with ThreadPoolExecutor(max_workers=len(scored_images.keys)) as pool:
        answers = list(pool.map(post_png, range(len(scored_images.keys))))
    for (status, answer), key in zip(answers, scored_images.keys):
        assert status == 200, answer
        (prediction,) = answer["predictions"]
        assert_matches_score(prediction, scored_images, key)
        assert (prediction["model"], prediction["version"]) == (RELOADED_NAME, "1")


def test_a_json_batch_shares_forward_passes_and_matches_flowray_score(
    serving: ServingInfo, scored_images: ScoredImages
) -> None:
    body = {"images": scored_images.images.astype(int).tolist(), "keys": scored_images.keys}
    status, answer = request(f"{serving.url}/score", json.dumps(body).encode(), "application/json")
    assert status == 200, answer
    predictions = answer["predictions"]
    for prediction, key in zip(predictions, scored_images.keys, strict=True):
        assert_matches_score(prediction, scored_images, key)
    assert max(p["batch_size"] for p in predictions) > 1


def test_a_jpeg_photo_is_fitted_to_the_models_shape_like_prepare_fits_folders(
    serving: ServingInfo,
) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (60, 45, 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    status, answer = request(f"{serving.url}/score", jpeg, "image/jpeg")
    assert status == 200, answer
    fitted = decode_fitted(jpeg, 1, (28, 28)).pixels
    body = json.dumps({"image": fitted.astype(int).tolist()}).encode()
    status, same = request(f"{serving.url}/score", body, "application/json")
    assert status == 200, same
    assert answer["predictions"][0]["bits_per_dim"] == same["predictions"][0]["bits_per_dim"]
    assert answer["predictions"][0]["key"] == same["predictions"][0]["key"]  # a pixel digest


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"hello", "text/plain", 415, "content type: expected application/json or one of"),
        (b"not a png", "image/png", 400, "image: cannot decode image"),
        (b'{"image": [[[0.5]]]}', "application/json", 400, "expected integers 0..255"),
        (b"{", "application/json", 400, "body: expected JSON"),
        (b'{"inputs": []}', "application/json", 400, "found ['inputs']"),
        (
            json.dumps({"image": np.full((1, 28, 28), 300).tolist()}).encode(),
            "application/json",
            400,
            "expected values in 0..255, found values from 300 to 300",
        ),
        (
            json.dumps({"images": np.zeros((2, 1, 8, 8), int).tolist()}).encode(),
            "application/json",
            400,
            "expected shape [B, 1, 28, 28] (B >= 1), found [2, 1, 8, 8]",
        ),
    ],
)
def test_a_bad_request_gets_a_4xx_saying_expected_and_found(
    serving: ServingInfo, body: bytes, content_type: str, status: int, message: str
) -> None:
    code, answer = request(f"{serving.url}/score", body, content_type)
    assert code == status
    assert message in answer["error"]


def raw_post(url: str, headers: dict[str, str], parts: list[bytes], timeout: float = 30) -> int:
    """The status of a POST sent over a raw socket: `headers` as given (a Content-Length may
    promise more than is sent), then `parts` one by one, stopping as soon as an answer arrives;
    the body is never finished, as a slow or lying client would do."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].partition("/")[2]
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        lines = [f"POST {path.rstrip('/')}/score HTTP/1.1", f"Host: {host}:{port}"]
        head = "\r\n".join(lines + [f"{k}: {v}" for k, v in headers.items()]) + "\r\n\r\n"
        connection.sendall(head.encode())
        for part in parts:
            if select.select([connection], [], [], 0.05)[0]:
                break  # answered before the body was sent
            connection.sendall(part)
        answer = connection.recv(65536)  # waits up to `timeout`
    return int(answer.split()[1])


@pytest.mark.parametrize(
    ("content_type", "declared"),
    [("image/png", 10**9), ("application/json", 2 * 10**8)],  # 1 GB; 10^8 numbers as "0,"
    ids=["1GB-image", "1e8-number-json"],
)
def test_a_body_declared_too_large_is_refused_before_it_is_read(
    serving: ServingInfo, content_type: str, declared: int
) -> None:
    started = time.monotonic()
    headers = {"Content-Type": content_type, "Content-Length": str(declared)}
    assert raw_post(serving.url, headers, [b"[" + b"0," * 32768]) == 413
    assert time.monotonic() - started < 10


def test_a_streamed_body_is_counted_and_cut_at_the_limit(serving: ServingInfo) -> None:
    megabyte = b"0," * (1 << 19)
    chunk = f"{len(megabyte):x}\r\n".encode() + megabyte + b"\r\n"
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    # No Content-Length: the server counts what arrives; 64 MB would be sent were it not cut.
    assert raw_post(serving.url, headers, [b"1\r\n[\r\n"] + [chunk] * 64) == 413


def wide_grey_png(width: int, height: int) -> bytes:
    """A valid 16-bit greyscale PNG of zeros, compressed row by row (a few hundred KB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    packer, row = zlib.compressobj(9), bytes(1 + 2 * width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_a_16_bit_8192_square_png_is_refused_before_decoding(serving: ServingInfo) -> None:
    png = wide_grey_png(8192, 8192)
    started = time.monotonic()
    status, answer = request(f"{serving.url}/score", png, "image/png")
    assert (status, time.monotonic() - started < 5) == (413, True), answer
    assert "8192x8192" in answer["error"] and "max_pixels" in answer["error"]


def test_health_answers_within_a_second_while_large_images_decode(serving: ServingInfo) -> None:
    from PIL import Image

    gradient = Image.linear_gradient("L").resize((4000, 4000)).convert("RGB")
    buffer = io.BytesIO()
    gradient.save(buffer, format="PNG", compress_level=1)
    png = buffer.getvalue()
    latencies: list[float] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        posts = [pool.submit(request, f"{serving.url}/score", png, "image/png") for _ in range(8)]
        while not all(post.done() for post in posts):
            started = time.monotonic()
            assert get(f"{serving.url}/health")["model"] == RELOADED_NAME
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        answers = [post.result() for post in posts]
    assert [status for status, _ in answers] == [200] * 8, answers[0]
    print(f"health: {len(latencies)} probes, slowest {max(latencies):.3f} s")
    assert len(latencies) >= 3 and max(latencies) < 1.0


def test_when_the_alias_moves_the_new_version_answers_without_a_restart(
    serving: ServingInfo, scored_images: ScoredImages, trained_model: TrainedModel
) -> None:
    from pipeline.model.artifact import load_flow
    from pipeline.tracking.registry import log_flow_model, register_flow

    png, key = scored_images.pngs[0], scored_images.keys[0]
    status, before = request(f"{serving.url}/score?key={key}", png, "image/png")
    assert status == 200 and before["predictions"][0]["version"] == "1"
    flow = load_flow(trained_model.directory)
    with torch.no_grad():  # another model of the same shape: a nudged top prior
        flow.top_prior.mu.add_(0.05)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("tests").experiment_id):
        promotion = register_flow(log_flow_model(flow).model_uri, RELOADED_NAME, 3.9)
    assert (promotion.version, promotion.promoted) == ("2", True)

    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while get(f"{serving.url}/health")["version"] != "2":
        assert time.monotonic() < deadline, f"still v1 {RELOAD_TIMEOUT_S} s after the alias moved"
        time.sleep(0.2)  # a poll interval
    status, after = request(f"{serving.url}/score?key={key}", png, "image/png")
    assert status == 200 and after["predictions"][0]["version"] == "2"
    assert after["predictions"][0]["bits_per_dim"] != before["predictions"][0]["bits_per_dim"]
