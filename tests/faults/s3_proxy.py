"""A fault-injecting S3 endpoint for tests: an HTTP proxy on 127.0.0.1 in front of moto's server.

    proxy = FaultyS3Proxy(upstream="http://127.0.0.1:5000", plan=FaultPlan(seed=1, rate=0.05))
    proxy.start()                     # proxy.endpoint_url: give it to boto3, s3fs, StorageConfig
    ...
    proxy.counts                      # Counter({"gets": 812, "503": 9, "truncate": 11, ...})
    proxy.stop()

Every request is forwarded to the upstream endpoint unchanged (same Host header, so signatures
still match). Only object GETs (GET of /<bucket>/<key> with a non-empty key; listings, HEADs and
writes always pass) may be answered with a fault instead:

    "500"       500 InternalError, S3's XML error body
    "503"       503 SlowDown ("Please reduce your request rate."), S3's XML error body
    "reset"     the connection is reset (RST) before any byte of the response
    "stall"     status, headers and the first half of the body, then nothing for `stall_s` seconds
                (or until the proxy stops), then the connection is cut: a client with a shorter
                read timeout sees a timeout, others a truncated body
    "truncate"  status, headers (with the full Content-Length) and the first half of the body,
                then the connection is closed

Which GETs fail is decided from the seed, the object's key and how many GETs of that object came
before (never from arrival order or time), so a run is reproducible whatever the threads do:
GET number n of key k fails when hash(seed, k, n) < rate, with a kind drawn from the same hash.
`max_in_a_row` caps consecutive faults per object (after that many, the next GET of that object
passes); `max_faults` caps faults in total. `script` forces an exact sequence for chosen objects:
{"shard-000001.tar": ("truncate", "503")} fails the first two GETs of every key ending in that
name, in that order, then lets them pass (scripted keys ignore the rate).

Conditional writes (`If-None-Match: *` on a PUT), as S3-compatible stores differ:

    conditional_writes="honour"   forwarded as sent (moto honours it: 412 with
                                  <Condition>If-None-Match</Condition> when the key exists)
    conditional_writes="ignore"   the header is dropped before forwarding: the store overwrites
    conditional_writes="bare-412" a 412 answer loses its <Condition> element (as some stores send)

and `put_script` answers chosen PUTs before they reach the store: {"x.json": ("409", "pass",
"409")} answers the first PUT of every key ending in x.json with 409 ConditionalRequestConflict
(AWS's answer to concurrent conditional writes), forwards the second, answers the third with 409,
and forwards every later one.

Bounded: loopback only, `max_faults` faults, at most `max_connections` client connections at a time
(more are refused with a reset), idle connections closed after `idle_timeout_s`, every stall ends
after `stall_s` or at stop(); stop() cuts every connection still open.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import http.server
import re
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

__all__ = ["CONDITIONAL_WRITES", "FAULT_KINDS", "PUT_KINDS", "FaultPlan", "FaultyS3Proxy"]

FAULT_KINDS = ("500", "503", "reset", "stall", "truncate")
PUT_KINDS = ("409", "pass")
CONDITIONAL_WRITES = ("honour", "ignore", "bare-412")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade", "te"}
_ERROR_BODIES = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}


@dataclass(frozen=True)
class FaultPlan:
    """What the proxy does to object GETs (see the module docstring)."""

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    max_in_a_row: int | None = None  # per object; None: no cap
    max_faults: int = 100_000
    stall_s: float = 2.0
    script: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conditional_writes: str = "honour"
    put_script: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate: expected a fraction in [0, 1], found {self.rate}")
        unknown = {k for k in self.kinds if k not in FAULT_KINDS} | {
            k for kinds in self.script.values() for k in kinds if k not in FAULT_KINDS
        }
        if unknown or not self.kinds:
            raise ValueError(f"kinds: expected some of {FAULT_KINDS}, found {sorted(unknown)}")
        if self.max_in_a_row is not None and self.max_in_a_row < 1:
            raise ValueError(f"max_in_a_row: expected at least 1, found {self.max_in_a_row}")
        if self.conditional_writes not in CONDITIONAL_WRITES:
            raise ValueError(
                f"conditional_writes: expected one of {CONDITIONAL_WRITES}, "
                f"found {self.conditional_writes!r}"
            )
        bad_puts = {k for kinds in self.put_script.values() for k in kinds if k not in PUT_KINDS}
        if bad_puts:
            raise ValueError(f"put_script: expected some of {PUT_KINDS}, found {sorted(bad_puts)}")
        if not 0 < self.stall_s <= 60:
            raise ValueError(f"stall_s: expected 0 < seconds <= 60, found {self.stall_s}")


def _draw(seed: int, key: str, attempt: int) -> tuple[float, int]:
    """A uniform number in [0, 1) and an integer, both fixed by (seed, key, attempt)."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{attempt}".encode()).digest()
    uniform, pick = struct.unpack(">QQ", digest[:16])
    return uniform / 2**64, pick


class _Decider:
    """Per-object GET counts and fault runs; thread-safe."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.in_a_row: Counter[str] = Counter()
        self.faults = 0
        self.puts: Counter[str] = Counter()

    def decide_put(self, key: str) -> str:
        """ "409" or "pass" for this PUT of `key`, from `put_script`."""
        with self.lock:
            attempt = self.puts[key]
            self.puts[key] += 1
            for suffix, kinds in self.plan.put_script.items():
                if key.endswith(suffix):
                    return kinds[attempt] if attempt < len(kinds) else "pass"
            return "pass"

    def _scripted(self, key: str) -> tuple[str, ...] | None:
        for suffix, kinds in self.plan.script.items():
            if key.endswith(suffix):
                return kinds
        return None

    def decide(self, key: str) -> str | None:
        plan = self.plan
        with self.lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
            scripted = self._scripted(key)
            if scripted is not None:
                kind = scripted[attempt] if attempt < len(scripted) else None
            else:
                uniform, pick = _draw(plan.seed, key, attempt)
                capped = plan.max_in_a_row is not None and self.in_a_row[key] >= plan.max_in_a_row
                kind = plan.kinds[pick % len(plan.kinds)] if uniform < plan.rate else None
                kind = None if capped else kind
            if kind is not None and self.faults >= plan.max_faults:
                kind = None
            if kind is None:
                self.in_a_row[key] = 0
            else:
                self.in_a_row[key] += 1
                self.faults += 1
            return kind


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.proxy.idle_timeout_s)
        self.upstream: http.client.HTTPConnection | None = None

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        if self.upstream is not None:
            self.upstream.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass  # one line per request would drown the test output

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(
        self, body: bytes, drop: frozenset[str] = frozenset()
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | drop}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout_s
                )
            try:
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                response = self.upstream.getresponse()
                data = response.read()
                return response.status, response.reason, response.getheaders(), data
            except (http.client.HTTPException, ConnectionError):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]], size: int):
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(size))
        self.end_headers()

    def _object_key(self, command: str = "GET") -> str | None:
        """`bucket/key` of an object request of `command` (path-style addressing), else None."""
        if self.command != command:
            return None
        bucket, _, key = urlsplit(self.path).path.lstrip("/").partition("/")
        return f"{bucket}/{key}" if bucket and key else None

    def _send_error(self, status: int, reason: str, code: str, message: str, key: str) -> None:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>/{key}</Resource><RequestId>fault-{status}</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml")]
        if status == 503:
            headers.append(("Retry-After", "1"))
        self._send_head(status, reason, headers, len(xml))
        self.wfile.write(xml)

    def _handle_put(self, key: str, body: bytes) -> None:
        """A PUT: scripted 409s, then the plan's handling of conditional writes."""
        proxy = self.server.proxy
        if proxy._decider.decide_put(key) == "409":
            proxy._count("requests", "409")
            self._send_error(
                409,
                "Conflict",
                "ConditionalRequestConflict",
                "A conflicting conditional operation is currently in progress against this "
                "resource. Please try again.",
                key,
            )
            return
        mode = proxy.plan.conditional_writes
        conditional = "If-None-Match" in self.headers
        drop = frozenset({"if-none-match"}) if mode == "ignore" else frozenset()
        status, reason, headers, data = self._forward(body, drop)
        if mode == "bare-412" and status == 412:
            data = re.sub(rb"<Condition>.*?</Condition>", b"", data)
        proxy._count(
            "requests",
            "puts",
            "conditional_puts" if conditional else None,
            "412" if status == 412 else None,
        )
        self._send_head(status, reason, headers, len(data))
        self.wfile.write(data)

    def _handle(self) -> None:
        proxy = self.server.proxy
        body = self._body()
        put_key = self._object_key("PUT")
        if put_key is not None and "uploadId" not in self.path:
            self._handle_put(put_key, body)
            return
        key = self._object_key()
        kind = proxy._decider.decide(key) if key is not None else None
        proxy._count("requests", "gets" if key is not None else None, kind)
        if kind == "reset":
            self._reset()
            return
        if kind in _ERROR_BODIES:
            code, message = _ERROR_BODIES[kind]
            self._send_error(int(kind), "Service Unavailable", code, message, key)
            return
        status, reason, headers, data = self._forward(body)
        declared = len(data)
        if self.command == "HEAD":
            declared = int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
        self._send_head(status, reason, headers, declared)
        if kind is None:
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        self.wfile.write(data[: len(data) // 2])  # stall or truncate: half, then stop
        self.wfile.flush()
        if kind == "stall":
            proxy._stopping.wait(proxy.plan.stall_s)
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultyS3Proxy) -> None:
        self.proxy = proxy
        super().__init__(("127.0.0.1", 0), _Handler)

    def verify_request(self, request: socket.socket, client_address: object) -> bool:
        return self.proxy._admit(request)

    def shutdown_request(self, request: socket.socket) -> None:
        self.proxy._release(request)
        super().shutdown_request(request)

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that hangs up mid-response (its timeout, a reset we sent) is expected here.
        self.proxy._count("handler_errors")


class FaultyS3Proxy:
    """The proxy (see the module docstring). `plan` may be replaced between requests."""

    def __init__(
        self,
        upstream: str,
        plan: FaultPlan | None = None,
        *,
        max_connections: int = 64,
        idle_timeout_s: float = 30.0,
        upstream_timeout_s: float = 60.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"upstream: expected a loopback endpoint, found {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.upstream_timeout_s = upstream_timeout_s
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.counts: Counter[str] = Counter()
        self.set_plan(plan or FaultPlan())

    @property
    def plan(self) -> FaultPlan:
        return self._decider.plan

    def set_plan(self, plan: FaultPlan) -> None:
        """Use `plan` from now on, with fresh per-object counts and fault totals."""
        self._decider = _Decider(plan)
        with self._lock:
            self.counts = Counter()

    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self.endpoint_url

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:  # idle keep-alive connections: end their handler threads now
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = None

    def __enter__(self) -> FaultyS3Proxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- bookkeeping (called from handler threads) ------------------------------------------
    def _admit(self, sock: socket.socket) -> bool:
        with self._lock:
            if len(self._open) >= self.max_connections:
                return False
            self._open.add(sock)
            return True

    def _release(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def _count(self, *names: str | None) -> None:
        with self._lock:
            self.counts.update(n for n in names if n is not None)

    @property
    def faults(self) -> int:
        with self._lock:
            return sum(self.counts[k] for k in FAULT_KINDS)
