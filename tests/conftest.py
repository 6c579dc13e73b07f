"""Fixtures for the whole suite: Fashion-MNIST on disk, an S3 endpoint on loopback, local Ray.

fashion_mnist_dir   Path of the four IDX files (FASHION_MNIST_DIR or the Debian location);
                    skips the test when they are absent.
aws_credentials     Fake AWS credentials and region in the environment, for the session, and
                    isolation from any real ~/.aws config. `s3_server` and `ray_local` both
                    use it, so Ray workers (which inherit the environment at ray.init) can sign
                    requests to moto too.
s3_server           moto's ThreadedMotoServer on 127.0.0.1 on a free port (session); its value
                    is the endpoint URL. Ray workers reach it (in-process mock_aws would not).
s3                  per test: moto state reset (POST /moto-api/reset), a fresh bucket, and an
                    `S3Bucket` with .endpoint_url, .bucket, .url ("s3://<bucket>") and .storage
                    (a `StorageConfig` pointing at the endpoint). With FLOWRAY_TEST_S3_FAULTS set
                    (e.g. "rate=0.05,seed=1,max_in_a_row=4"; keys are `FaultPlan` fields, kinds
                    joined by "+"), .endpoint_url is a fault proxy in front of moto, so every S3
                    test runs under injected faults; .direct_endpoint_url is always moto itself.
faulty_s3           per test: the `s3` bucket, plus a `FaultyS3Proxy` in front of moto with no
                    faults until the test sets a plan (`faulty_s3.proxy.set_plan(FaultPlan(...))`);
                    .bucket goes through the proxy, .direct around it. See tests/faults/s3_proxy.py.
ray_local           a local Ray instance with 2 CPUs and no dashboard for the session; a test
                    that uses it (or `trained_model`) is in the integration tier
                    (address="local": never joins a cluster that happens to run here).
"""

from __future__ import annotations

import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.data.sources import DEFAULT_FASHION_MNIST_DIR
from pipeline.storage import StorageConfig
from tests.faults.s3_proxy import FaultPlan, FaultyS3Proxy

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
TEST_BUCKET = "flowray-test"
FAULTS_ENV = "FLOWRAY_TEST_S3_FAULTS"


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    folder = Path(os.environ.get("FASHION_MNIST_DIR") or DEFAULT_FASHION_MNIST_DIR)
    missing = [name for name in IDX_FILES if not (folder / name).exists()]
    if missing:
        pytest.skip(
            f"Fashion-MNIST IDX files not found in {folder} (missing {', '.join(missing)}); "
            "install dataset-fashion-mnist (make setup) or set FASHION_MNIST_DIR"
        )
    return folder


@pytest.fixture(scope="session")
def aws_credentials() -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ACCESS_KEY_ID", "flowray-test-key")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "flowray-test-secret")
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    patch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1-second instance-metadata probes
    patch.setenv("AWS_CONFIG_FILE", os.devnull)
    patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION"):
        patch.delenv(name, raising=False)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def s3_server(aws_credentials: None) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass(frozen=True)
class S3Bucket:
    endpoint_url: str
    bucket: str
    direct_endpoint_url: str = ""  # moto itself, around any fault proxy ("" = endpoint_url)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def storage(self) -> StorageConfig:
        return StorageConfig(endpoint_url=self.endpoint_url, region="us-east-1")

    def client(self, direct: bool = True):
        """A boto3 client; direct=True goes around the fault proxy (test setup, checks)."""
        import boto3

        endpoint = (self.direct_endpoint_url or self.endpoint_url) if direct else self.endpoint_url
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _plan_from_env(text: str) -> FaultPlan:
    """FLOWRAY_TEST_S3_FAULTS="rate=0.05,seed=1,max_in_a_row=4,kinds=500+503" as a FaultPlan."""
    fields: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name == "kinds":
            fields[name] = tuple(value.split("+"))
        elif name in ("rate", "stall_s"):
            fields[name] = float(value)
        elif name in ("seed", "max_in_a_row", "max_faults"):
            fields[name] = int(value)
        else:
            raise ValueError(f"{FAULTS_ENV}: unknown setting {name!r} in {text!r}")
    return FaultPlan(**fields)


@pytest.fixture(scope="session")
def _env_fault_proxy(s3_server: str) -> Iterator[FaultyS3Proxy | None]:
    text = os.environ.get(FAULTS_ENV, "")
    if not text:
        yield None
        return
    with FaultyS3Proxy(s3_server, _plan_from_env(text)) as proxy:
        yield proxy


@pytest.fixture
def s3(s3_server: str, _env_fault_proxy: FaultyS3Proxy | None) -> S3Bucket:
    import boto3

    request = urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=TEST_BUCKET)
    endpoint = _env_fault_proxy.endpoint_url if _env_fault_proxy else s3_server
    return S3Bucket(endpoint, TEST_BUCKET, direct_endpoint_url=s3_server)


@dataclass(frozen=True)
class FaultyS3:
    proxy: FaultyS3Proxy
    bucket: S3Bucket  # through the proxy
    direct: S3Bucket  # moto itself


@pytest.fixture
def faulty_s3(s3: S3Bucket, s3_server: str) -> Iterator[FaultyS3]:
    with FaultyS3Proxy(s3_server) as proxy:
        through = S3Bucket(proxy.endpoint_url, s3.bucket, direct_endpoint_url=s3_server)
        yield FaultyS3(proxy, through, S3Bucket(s3_server, s3.bucket))


@pytest.fixture(scope="session")
def ray_local(aws_credentials: None) -> Iterator[None]:
    import ray

    if ray.is_initialized():  # another fixture or test already started one: share it
        yield
        return
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level=logging.WARNING,
    )  # workers get the driver's sys.path, so they import the checkout's packages
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    """Real RGB photos (scikit-image's bundled astronaut, coffee, chelsea) cut into patches and
    saved under class folders: 18 files, PNG and JPEG, mixed sizes, one RGBA and one greyscale.

    astronaut/: six 32x32 RGB PNGs, exactly the target size of the tests (pixels pass through).
    coffee/:    96x64 patches as JPEG (quality 90), and one 16-bit greyscale PNG.
    chelsea/:   80x120 patches as PNG, one with an alpha channel.
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    root = tmp_path / "photos"
    for name in ("astronaut", "coffee", "chelsea"):
        (root / name).mkdir(parents=True)
    astronaut, coffee, chelsea = data.astronaut(), data.coffee(), data.chelsea()
    for i in range(6):
        patch = astronaut[100 + 32 * i : 132 + 32 * i, 200:232]
        Image.fromarray(patch).save(root / "astronaut" / f"patch-{i}.png")
    for i in range(5):
        patch = coffee[50 * i : 50 * i + 64, 100 + 80 * i : 196 + 80 * i]
        Image.fromarray(patch).save(root / "coffee" / f"patch-{i}.jpg", quality=90)
    grey16 = (data.camera()[:64, :96].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(root / "coffee" / "patch-grey16.png")
    for i in range(5):
        patch = chelsea[30 * i : 30 * i + 120, 60 * i : 60 * i + 80]
        Image.fromarray(patch).save(root / "chelsea" / f"patch-{i}.png")
    rgba = np.dstack([chelsea[:120, 200:280], np.full((120, 80), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "chelsea" / "patch-rgba.png")
    return root


# Fixtures that start Ray or train a model: a test that uses one (directly or through another
# fixture) belongs to the integration tier (`make test-integration`), not to `make test`.
INTEGRATION_FIXTURES = frozenset({"ray_local", "trained_model"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
