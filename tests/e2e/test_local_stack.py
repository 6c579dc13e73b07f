"""The local stack of infra/local: each service answers as the rest of flowray expects, a job submitted
to the two-node cluster runs, the worker node can be stopped and rejoin, and the stop scripts leave
no process behind."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def _run_python(code: str, env: dict[str, str], timeout: int = 120) -> str:
    """Run code in a fresh interpreter (a Ray driver must not live in the test process)."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _alive_nodes(stack) -> list[dict[str, float]]:
    """Resources of the cluster's live nodes, seen by a driver connected to the GCS address."""
    out = _run_python(
        f"""
        import json, ray
        ray.init(address={stack.ray_address!r}, logging_level="ERROR")
        print(json.dumps([n["Resources"] for n in ray.nodes() if n["Alive"]]))
        """,
        stack.environ(),
    )
    return json.loads(out.strip().splitlines()[-1])


def test_s3_endpoint_serves_the_default_bucket(local_stack):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=local_stack.s3_endpoint,
        region_name=local_stack.env["AWS_DEFAULT_REGION"],
        aws_access_key_id=local_stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=local_stack.env["AWS_SECRET_ACCESS_KEY"],
    )
    assert local_stack.s3_endpoint.startswith("http://127.0.0.1:")
    assert local_stack.env["MLFLOW_S3_ENDPOINT_URL"] == local_stack.s3_endpoint
    s3.head_bucket(Bucket=local_stack.bucket)
    s3.put_object(Bucket=local_stack.bucket, Key="e2e/hello.txt", Body=b"hi")
    body = s3.get_object(Bucket=local_stack.bucket, Key="e2e/hello.txt")["Body"].read()
    assert body == b"hi"


def test_mlflow_server_records_runs_and_proxies_artifacts_to_s3(local_stack):
    assert local_stack.tracking_uri.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(f"{local_stack.tracking_uri}/health", timeout=10) as response:
        assert response.status == 200 and response.read().decode().strip() == "OK"

    # A client with no S3 credentials at all: artifacts go through the server.
    environ = {
        k: v
        for k, v in local_stack.environ().items()
        if not k.startswith("AWS_") and k != "MLFLOW_S3_ENDPOINT_URL"
    }
    experiment = f"e2e-stack-{uuid.uuid4().hex[:8]}"
    out = _run_python(
        f"""
        from mlflow import MlflowClient
        client = MlflowClient()
        experiment_id = client.create_experiment({experiment!r})
        run = client.create_run(experiment_id)
        client.log_param(run.info.run_id, "answer", "42")
        client.log_text(run.info.run_id, "hello", "note.txt")
        client.set_terminated(run.info.run_id)
        again = client.get_run(run.info.run_id)
        print(again.info.run_id, again.data.params["answer"], again.info.artifact_uri)
        """,
        environ,
    )
    run_id, answer, artifact_uri = out.split()[-3:]
    assert answer == "42"
    assert artifact_uri.startswith("mlflow-artifacts:/")

    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=local_stack.s3_endpoint,
        region_name=local_stack.env["AWS_DEFAULT_REGION"],
        aws_access_key_id=local_stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=local_stack.env["AWS_SECRET_ACCESS_KEY"],
    )
    listing = s3.list_objects_v2(Bucket=local_stack.bucket, Prefix="mlflow-artifacts/")
    keys = [item["Key"] for item in listing.get("Contents", [])]
    assert any(key.endswith(f"{run_id}/artifacts/note.txt") for key in keys), keys


def test_ray_cluster_has_a_head_and_a_worker_node_with_their_resources(local_stack):
    assert local_stack.env["RAY_AUTH_MODE"] == "token"
    nodes = _alive_nodes(local_stack)
    assert len(nodes) == 2
    heads = [n for n in nodes if n.get("head") == 1.0]
    workers = [n for n in nodes if n.get("worker_node") == 1.0]
    assert len(heads) == 1 and len(workers) == 1 and heads[0] is not workers[0]
    assert heads[0]["CPU"] == 2.0 and workers[0]["CPU"] == 2.0


def test_a_submitted_job_runs_tasks_on_both_nodes(local_stack, tmp_path):
    (tmp_path / "where.py").write_text(
        textwrap.dedent(
            """
            import ray
            ray.init()

            @ray.remote(num_cpus=0)
            def node():
                return ray.get_runtime_context().get_node_id()

            head = ray.get(node.options(resources={"head": 0.01}).remote())
            worker = ray.get(node.options(resources={"worker_node": 0.01}).remote())
            print("NODES", head != worker)
            """
        )
    )
    result = subprocess.run(
        ["ray", "job", "submit", "--working-dir", str(tmp_path), "--", "python", "where.py"],
        env=local_stack.environ(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NODES True" in result.stdout
    # The token is sent, never shown.
    token_file = Path.home() / ".ray" / "auth_token"
    if token_file.exists():
        assert token_file.read_text().strip() not in result.stdout + result.stderr


def test_worker_node_can_be_stopped_and_rejoin(local_stack):
    groups = local_stack.process_groups()
    local_stack.stop_worker_node(kill=True)
    assert not local_stack.live_processes(groups["ray-worker"])
    assert local_stack.live_processes(groups["ray-head"]), "stopping the worker stopped the head"
    local_stack.start_worker_node()
    nodes = _alive_nodes(local_stack)
    assert sorted(k for n in nodes for k in ("head", "worker_node") if k in n) == [
        "head",
        "worker_node",
    ]


def test_stop_scripts_stop_every_process_they_started(local_stack):
    groups = local_stack.process_groups()
    assert set(groups) == {"s3", "mlflow", "ray-head", "ray-worker"}
    assert all(local_stack.live_processes(pgid) for pgid in groups.values())

    local_stack.down()

    for name, pgid in groups.items():
        assert not local_stack.live_processes(pgid), f"{name} left processes behind"
    assert local_stack.process_groups() == {}
    assert not list(local_stack.stack_dir.glob("*.env"))
    # Stopping again is a no-op, not an error.
    local_stack.down()
