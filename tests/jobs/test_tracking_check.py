"""The quick tracking-server check before a batch job: a server that is up passes, whatever
credentials its URI carries, and one that is down fails in seconds without printing them."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator

import pytest

from jobs._batch import check_tracking_server
from jobs.errors import UserError


class _Health(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:  # noqa: N802 (the base's name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, list[tuple[str, str | None]]]]:
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_Health,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_a_tracking_uri_with_user_and_password_is_checked_with_basic_auth(health_server):
    port, seen = health_server
    check_tracking_server(f"http://bob:p%40ss@127.0.0.1:{port}/")
    assert check_tracking_server(f"http://127.0.0.1:{port}") == f"http://127.0.0.1:{port}"
    expected = "Basic " + base64.b64encode(b"bob:p@ss").decode()
    assert seen == [("/health", expected), ("/health", None)]


def test_a_server_that_is_down_fails_without_showing_the_password():
    with pytest.raises(UserError) as info:
        check_tracking_server("http://bob:s3cret@127.0.0.1:9/", timeout=2)
    assert info.value.exit_code == 1
    assert "s3cret" not in str(info.value)
    assert "http://127.0.0.1:9/" in str(info.value)


def test_the_checked_uri_is_the_resolved_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert check_tracking_server(None, str(tmp_path)) == f"sqlite:///{tmp_path}/mlflow.db"
