"""What `flowray serve` is asked: the model, the HTTP address, batching, reloading and limits."""

from __future__ import annotations

from dataclasses import dataclass

from flowmodel.typed import check_at_least, check_required


@dataclass(frozen=True)
class ServeConfig:
    """One served model.

    Attributes:
        model: models:/<name>@<alias> (reloaded when the alias moves), models:/<name>/<version>,
            runs:/<id>/<path> or a local model directory.
        tracking_uri: MLflow tracking URI the replicas read the registry from (None:
            $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db, workdir $FLOWRAY_WORKDIR or
            flowray-work).
        host: the host Ray Serve's HTTP proxy listens on (a cluster-wide Serve setting: an
            already running Serve keeps its own).
        port: the HTTP port of Ray Serve's proxy (cluster-wide, as host).
        route_prefix: the application's path prefix; routes are <prefix>/score, <prefix>/health.
        app_name: the Ray Serve application name.
        seed: dequantization seed, with the score job's meaning and default, so a request that
            gives an image's score key gets the score job's bits/dim.
        draws: dequantization draws per image, as the score job's.
        max_batch_size: most images per forward pass (@serve.batch).
        batch_wait_ms: longest wait for a batch to fill, in milliseconds.
        max_ongoing_requests: requests a replica holds at once (0: 2 x max_batch_size, so a
            full batch can form while the previous one runs).
        reload_interval_s: how often a replica asks the registry where the alias points
            (0: never; only models:/<name>@<alias> references reload).
        replicas: Ray Serve replicas of the deployment.
        cpus_per_replica: Ray CPUs of each replica.
        access_log: one log line per request in the replicas' logs (Ray Serve's access log).
        max_image_bytes: most bytes of an encoded image body (413 above, before reading it).
        max_json_bytes: most bytes of a JSON body (413 above, before reading it).
        max_pixels: most pixels of an encoded image, from its header (a quarter of it for 16-
            and 32-bit images; 413 above, before decoding).
        decode_threads: threads per replica that parse and decode request bodies, off the event
            loop; at most this many images are being decoded at once.
    """

    model: str
    tracking_uri: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    app_name: str = "flowray"
    seed: int = 0
    draws: int = 1
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    max_ongoing_requests: int = 0
    reload_interval_s: float = 30.0
    replicas: int = 1
    cpus_per_replica: float = 1.0
    access_log: bool = True
    max_image_bytes: int = 16 << 20
    max_json_bytes: int = 8 << 20
    max_pixels: int = 4096 * 4096
    decode_threads: int = 2

    def __post_init__(self) -> None:
        check_required(self, "model")
        if not 0 < self.port < 65536:
            raise ValueError(f"port: expected 1..65535, found {self.port}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(
                f"route_prefix: expected a path starting with /, found {self.route_prefix!r}"
            )
        limits = ("max_image_bytes", "max_json_bytes", "max_pixels")
        check_at_least(self, 1, *limits, "max_batch_size", "draws", "replicas", "decode_threads")
        check_at_least(self, 0, "batch_wait_ms", "reload_interval_s", "max_ongoing_requests")
        if self.cpus_per_replica <= 0:
            raise ValueError(f"cpus_per_replica: expected > 0, found {self.cpus_per_replica}")

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"
