"""The pipeline on the two-node local cluster, every job sent with `flowray submit`: prepare
Fashion-MNIST shards on S3, train with one worker on each node, find the champion on the tracking
server, score the test split and sample; then the faults users meet: the worker node dies during
training, and the S3 endpoint restarts during scoring.

The tests run in order and build on each other (shards, then a champion to score with).

Sizes: 1,000 train and 1,000 test images in shards of 250, a flow with 2 steps per level and 16
hidden channels, 2 workers x batch 16 for 20 steps: the point is the plumbing, not the model.

Placement: each node has 3 logical CPUs here and each Train worker asks for 2, so two workers fit
only one per node (Ray Train's default PACK placement would put two 1-CPU workers on one node),
and each node keeps 1 CPU for Ray Data's read tasks (Data does not use Train's CPUs).

The jobs get the S3 endpoint, the tracking URI and credentials only from `flowray submit`: the Ray
nodes were started without them. The AWS secret is a random string that must never be printed.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from pipeline.train.worker import HOOKS_VARIABLE
from tests.e2e.conftest import ROOT, LocalStack

pytestmark = pytest.mark.cluster

CLUSTER_SETTINGS = {"RAY_HEAD_CPUS": "3", "RAY_WORKER_CPUS": "3"}
TRAIN_IMAGES = TEST_IMAGES = 1000
SHARD_IMAGES = 250
JOB_TIMEOUT_S = 420
# A small, fast run: what matters is where it runs and what it leaves behind.
TRAIN_SETTINGS = [
    "model.steps_per_level=2",
    "model.hidden_channels=16",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=2",
    "scaling.max_failures=2",
    "batch_size=16",
    "init_images=64",
    "optim.warmup_steps=5",
    "data.shuffle_buffer=128",
    "data.validation_limit=200",
    "eval_batch_size=200",
    "eval_every=1000",
    "log_every=5",
]


@dataclass
class Pipeline:
    """What the tests share: the stack, names unique to this session, and what earlier tests made."""

    stack: LocalStack
    uid: str
    secret: str
    results: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"s3://{self.stack.bucket}/e2e-{self.uid}"

    @property
    def model(self) -> str:
        return f"e2e-flow-{self.uid}"

    def environ(self) -> dict[str, str]:
        """The submitting shell: the stack's exports with a secret that must not leak."""
        return self.stack.environ() | {"AWS_SECRET_ACCESS_KEY": self.secret}

    def train_args(
        self, run_name: str, steps: int, checkpoint_every: int, model: str | None = None
    ) -> list[str]:
        settings = TRAIN_SETTINGS + [
            f"data.train={self.prefix}/fmnist/train",
            f"data.validation={self.prefix}/fmnist/test",
            f"run.storage_path={self.prefix}/runs",
            f"run.name={run_name}",
            f"mlflow.registered_model={model or self.model}",
            f"mlflow.experiment=e2e-{self.uid}",
            f"max_steps={steps}",
            f"checkpoint_every={checkpoint_every}",
        ]
        return ["--config", "fashion-mnist", *(a for s in settings for a in ("--set", s))]

    # -- S3 as the test sees it (explicit credentials: the test process has none of its own) --
    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.stack.s3_endpoint,
            region_name=self.stack.env["AWS_DEFAULT_REGION"],
            aws_access_key_id="e2e",
            aws_secret_access_key=self.secret,
        )

    def keys(self, url: str) -> list[str]:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, url: str) -> bytes:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        return self.s3().get_object(Bucket=bucket, Key=key)["Body"].read()

    def scores(self, output: str, version: str):
        """All rows of the Parquet files of one model version under a scoring output."""
        import pandas as pd

        folder = f"{output}/model={self.model}/version={version}/"
        files = [k for k in self.keys(folder) if k.endswith(".parquet")]
        frames = [
            pd.read_parquet(io.BytesIO(self.read(f"s3://{self.stack.bucket}/{k}"))) for k in files
        ]
        return files, pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@pytest.fixture(scope="module")
def pipeline(stack: LocalStack) -> Iterator[Pipeline]:
    stack.use_cluster_settings(**CLUSTER_SETTINGS)
    stack.up()
    yield Pipeline(stack, uid=uuid.uuid4().hex[:6], secret=f"e2e-secret-{uuid.uuid4().hex}")
    # The next tests expect the scripts' default cluster.
    stack.use_cluster_settings()


@dataclass
class Submitted:
    code: int
    out: str  # stdout and stderr, interleaved as printed

    def job_id(self) -> str:
        return re.search(r"job (\S+) submitted", self.out).group(1)


def _command(*args: str) -> list[str]:
    # The worker nodes start without credentials: the jobs take this shell's, as a user of a
    # cluster without instance roles would.
    return [sys.executable, "-m", "jobs.cli", "submit", "--forward-credentials", *args]


def submit(pipeline: Pipeline, *args: str, timeout: int = JOB_TIMEOUT_S) -> Submitted:
    """`flowray submit <args>` to the end of the job; fails the test on a timeout."""
    result = subprocess.run(
        _command(*args),
        env=pipeline.environ(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    done = Submitted(result.returncode, result.stdout)
    assert pipeline.secret not in done.out, "the AWS secret was printed"
    return done


class Background:
    """`flowray submit` running in the background; `wait_for(pattern)` watches its output."""

    def __init__(self, pipeline: Pipeline, *args: str) -> None:
        self.pipeline = pipeline
        self.process = subprocess.Popen(
            _command(*args),
            env=pipeline.environ(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = JOB_TIMEOUT_S) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.5)
        pytest.fail(
            f"no {pattern!r} in the output of flowray submit:\n{''.join(self.lines)[-6000:]}"
        )

    def finish(self, timeout: float = JOB_TIMEOUT_S) -> Submitted:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"flowray submit did not finish:\n{''.join(self.lines)[-6000:]}")
        self.reader.join(timeout=10)
        done = Submitted(code, "".join(self.lines))
        assert self.pipeline.secret not in done.out, "the AWS secret was printed"
        return done


def assert_succeeded(done: Submitted) -> None:
    assert done.code == 0 and re.search(r"job \S+: SUCCEEDED", done.out), done.out[-6000:]


def ray_query(stack: LocalStack, code: str) -> object:
    """Run `code` (which prints one JSON line last) against the cluster, in a fresh interpreter
    with the stack's environment (token auth included)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=stack.environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_worker_nodes(stack: LocalStack, submission_id: str) -> dict[str, object]:
    """Node ids of the RayTrainWorker actors of a job, and the head's and worker node's ids."""
    return ray_query(
        stack,
        f"""
        import json
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors, list_nodes
        url = {stack.dashboard_url!r}
        job = JobSubmissionClient(url).get_job_info({submission_id!r}).job_id
        actors = list_actors(address=url, filters=[("class_name", "=", "RayTrainWorker"),
                             ("job_id", "=", job)], detail=True, limit=1000)
        nodes = list_nodes(address=url, detail=True, limit=100)
        print(json.dumps({{
            "workers": sorted({{a.node_id for a in actors}}),
            "head": [n.node_id for n in nodes if n.is_head_node],
            "others": [n.node_id for n in nodes if not n.is_head_node],
        }}))
        """,
    )


# -- the pipeline -----------------------------------------------------------------------------------
def test_prepare_writes_fashion_mnist_shards_to_s3(pipeline, fashion_mnist_dir):
    done = submit(
        pipeline,
        "prepare",
        *("--source", f"idx:{fashion_mnist_dir}", "--output", f"{pipeline.prefix}/fmnist"),
        *("--limit", str(TRAIN_IMAGES), "--shard-samples", str(SHARD_IMAGES)),
    )
    assert_succeeded(done)
    # The summary masks the credentials that travel with the job.
    assert "AWS_SECRET_ACCESS_KEY=***" in done.out
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        manifest = json.loads(pipeline.read(f"{pipeline.prefix}/fmnist/{split}/manifest.json"))
        assert manifest["count"] == count
        shards = [
            k for k in pipeline.keys(f"{pipeline.prefix}/fmnist/{split}/") if k.endswith(".tar")
        ]
        assert len(shards) == count // SHARD_IMAGES


def test_training_puts_one_worker_on_each_node_and_registers_a_champion(pipeline):
    submission_id = f"e2e-train-{pipeline.uid}"
    done = submit(
        pipeline,
        "--submission-id",
        submission_id,
        "train",
        *pipeline.train_args("spread", steps=20, checkpoint_every=10),
    )
    assert_succeeded(done)
    assert "done: 20 steps" in done.out
    # jobs/train.py: "model: registered <name> v<n> (alias candidate), now champion (...)"
    version = re.search(
        rf"model: registered {re.escape(pipeline.model)} v(\d+) \(alias candidate\), now champion",
        done.out,
    )
    assert version, done.out[-3000:]

    nodes = train_worker_nodes(pipeline.stack, submission_id)
    assert len(nodes["head"]) == 1 and len(nodes["others"]) >= 1
    assert nodes["head"][0] in nodes["workers"], nodes
    assert set(nodes["workers"]) & set(nodes["others"]), nodes
    assert len(nodes["workers"]) == 2, nodes

    from mlflow import MlflowClient

    champion = MlflowClient(pipeline.stack.tracking_uri).get_model_version_by_alias(
        pipeline.model, "champion"
    )
    assert champion.version == version.group(1)
    pipeline.results["version"] = champion.version


def test_scoring_the_test_split_writes_one_row_per_image(pipeline):
    version = pipeline.results.get("version") or pytest.skip("no champion (training failed)")
    output = f"{pipeline.prefix}/scores"
    done = submit(
        pipeline,
        "score",
        *(
            "--model",
            f"models:/{pipeline.model}@champion",
            "--input",
            f"{pipeline.prefix}/fmnist/test",
        ),
        *("--output", output),
    )
    assert_succeeded(done)
    files, rows = pipeline.scores(output, version)
    assert len(files) == TEST_IMAGES // SHARD_IMAGES
    assert len(rows) == TEST_IMAGES
    assert rows["key"].is_unique
    assert rows["bits_per_dim"].between(0, 8).all()


def test_sampling_writes_images_from_the_champion(pipeline):
    pipeline.results.get("version") or pytest.skip("no champion (training failed)")
    output = f"{pipeline.prefix}/samples"
    done = submit(
        pipeline,
        "sample",
        *("--model", f"models:/{pipeline.model}@champion", "-n", "16", "--output", output),
    )
    assert_succeeded(done)
    assert "generated 16 images" in done.out
    assert json.loads(pipeline.read(f"{output}/manifest.json"))["count"] == 16
    assert any(k.endswith(".tar") for k in pipeline.keys(f"{output}/"))


# -- faults -----------------------------------------------------------------------------------------
HOLD_STEP = 10


def latest_checkpoint_step(pipeline: Pipeline, run_url: str) -> int | None:
    """The step of the checkpoint Ray Train has registered as latest for a run (from its
    checkpoint manager snapshot in storage), or None before the first."""
    try:
        snapshot = json.loads(pipeline.read(f"{run_url}/checkpoint_manager_snapshot.json"))
    except pipeline.s3().exceptions.NoSuchKey:
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    step = (latest.get("metrics") or {}).get("step")
    return None if step is None else int(step)


def wait_until(condition, what: str, job: Background, timeout: float = JOB_TIMEOUT_S) -> None:
    """Poll `condition()` until it holds; fail if the job ends first or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.process.poll() is None, (
            f"the job ended before {what}:\n{''.join(job.lines)[-6000:]}"
        )
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.5)


def test_losing_the_worker_node_during_training_resumes_from_the_checkpoint(pipeline):
    """scaling.max_failures=2: the worker on the lost node dies with it, Ray Train retries, and the
    new worker group (placed once the node is back, as an autoscaler would bring one) resumes from
    the latest checkpoint. The job succeeds and `flowray submit` follows it throughout.

    Deterministic, whatever the machine's load: every worker holds at step 10 (hold_at_step)
    until the test writes the release marker, so training cannot pass that step before the node
    is killed; and the node is killed only once Ray Train has registered the step-10 checkpoint.
    The marker is written before the node comes back, so the resumed run does not hold again."""
    run = "node-loss"
    # A model name of its own: this run must not move the champion the other tests score with.
    args = pipeline.train_args(
        run, steps=30, checkpoint_every=5, model=f"{pipeline.model}-node-loss"
    )
    hooks = f"{HOOKS_VARIABLE}=" + json.dumps({"hold_at_step": HOLD_STEP})
    job = Background(pipeline, "--env", hooks, "train", *args)
    run_url = f"{pipeline.prefix}/runs/{run}"
    job.wait_for(rf"holding at step {HOLD_STEP}\b")
    wait_until(
        lambda: latest_checkpoint_step(pipeline, run_url) == HOLD_STEP,
        f"registered checkpoint at step {HOLD_STEP}",
        job,
    )
    pipeline.stack.stop_worker_node(kill=True)
    bucket, _, key = f"{run_url}/release-hold".removeprefix("s3://").partition("/")
    pipeline.s3().put_object(Bucket=bucket, Key=key, Body=b"released by the e2e test\n")
    pipeline.stack.start_worker_node()
    done = job.finish()

    assert_succeeded(done)
    # Ray Train saw the worker group fail and started a new one, which resumed from the step-10
    # checkpoint (the first error it reports varies: the dead node, a failed health check, or the
    # surviving worker's broken gloo connection). Its own "[FailurePolicy] RETRY" line is INFO,
    # off unless --verbose, so the evidence is our worker's resume line, printed by default.
    retry_at = done.out.find("resuming from checkpoint at step")
    assert retry_at >= 0, done.out[-6000:]
    before_retry = done.out[:retry_at]
    assert f"step {HOLD_STEP}/30" in before_retry, before_retry[-4000:]
    assert not re.search(r"step (1[1-9]|2\d|30)/30", before_retry), before_retry[-4000:]
    resumed = [int(s) for s in re.findall(r"resuming from checkpoint at step (\d+)", done.out)]
    assert resumed == [HOLD_STEP], done.out[-6000:]
    assert "done: 30 steps" in done.out


def test_s3_restart_during_scoring_then_a_rerun_scores_every_key_once(pipeline):
    """The endpoint goes away once the first shard's Parquet is written. Whether the job rides it
    out (retries) or fails, a rerun completes and every test image has exactly one row."""
    version = pipeline.results.get("version") or pytest.skip("no champion (training failed)")
    output = f"{pipeline.prefix}/scores-outage"
    args = (
        "score",
        *(
            "--model",
            f"models:/{pipeline.model}@champion",
            "--input",
            f"{pipeline.prefix}/fmnist/test",
        ),
        *("--output", output),
    )
    job = Background(pipeline, *args)
    folder = f"{output}/model={pipeline.model}/version={version}/"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(k.endswith(".parquet") for k in pipeline.keys(folder)):
        assert job.process.poll() is None, "".join(job.lines)[-6000:]
        assert time.monotonic() < deadline, "no Parquet file appeared"
        time.sleep(0.2)
    pipeline.stack.restart_s3()
    first = job.finish()
    # 0: rode it out; 1: the job failed; 3: finished with shards left out (the rerun reads them).
    assert first.code in (0, 1, 3), first.out[-6000:]
    # Shown with -rP: which way the outage went this time.
    print("first scoring job:", first.out.strip().splitlines()[-1])

    rerun = submit(pipeline, *args)
    assert_succeeded(rerun)
    # The outage can land after the last shard's file (scoring 4 small shards takes about a
    # second, the outage begins after the first file is seen): the rerun then has nothing to do.
    scored = re.search(r"\((\d+) shards written, (\d+) already done", rerun.out)
    nothing = re.search(r"nothing to score: all (\d+)/\d+ shards", rerun.out)
    assert scored or nothing, rerun.out[-6000:]
    written, skipped = map(int, scored.groups()) if scored else (0, int(nothing.group(1)))
    assert written + skipped == TEST_IMAGES // SHARD_IMAGES
    assert skipped >= 1  # the shards finished before the outage are not scored again
    files, rows = pipeline.scores(output, version)
    assert len(files) == TEST_IMAGES // SHARD_IMAGES
    assert len(rows) == TEST_IMAGES and rows["key"].is_unique
