"""Static checks of infra/: every YAML parses and carries the fields its kind needs, the pieces refer to
each other consistently (names, ports, Ray version, placeholders), and the local stack scripts parse.

Nothing here talks to a cluster: the manifests are checked by structure, the Ray cluster launcher
config by Ray's own validator, and by kubeconform only where it is installed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERNETES_DOC = ROOT / "docs" / "kubernetes.md"  # placeholders, Secrets, the nightly model
K8S = INFRA / "k8s"
LAUNCHER = INFRA / "cluster-launcher" / "aws.yaml"
LOCAL = INFRA / "local"

YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
K8S_FILES = sorted(K8S.glob("*.yaml"))
SHELL_SCRIPTS = sorted(LOCAL.glob("*.sh"))
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def _documents(path: Path) -> list[dict[str, Any]]:
    """The file's YAML documents (parsed once; callers must not modify them)."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in K8S_FILES for doc in _documents(path)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_objects() if doc["kind"] == kind]


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in _by_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r}, found {len(found)}"
    return found[0]


def _walk(node: Any):
    """Every dict inside node, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


# ---------------------------------------------------------------------------------------------------
# Every YAML file


def test_infra_has_the_expected_files():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {
        "k8s/config.yaml",
        "k8s/raycluster.yaml",
        "k8s/rayjob-train.yaml",
        "k8s/rayjob-score.yaml",
        "k8s/raycronjob-score.yaml",
        "k8s/mlflow.yaml",
        "cluster-launcher/aws.yaml",
    } <= names
    assert (INFRA / "Dockerfile").is_file()
    assert (INFRA / "README.md").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_yaml_parses_into_mappings(path):
    docs = _documents(path)
    assert docs, f"{path}: no YAML documents"
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_objects_have_api_version_kind_and_a_valid_name(path):
    for doc in _documents(path):
        assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], doc
        assert isinstance(doc.get("kind"), str) and doc["kind"], doc
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and DNS_LABEL.match(name) and len(name) <= 63, name
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "flowray"


def test_kinds_use_the_api_versions_their_controllers_serve():
    expected = {
        "RayCluster": "ray.io/v1",
        "RayJob": "ray.io/v1",
        "RayCronJob": "ray.io/v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "ConfigMap": "v1",
        "NetworkPolicy": "networking.k8s.io/v1",
    }
    kinds = {}
    for _, doc in _k8s_objects():
        kinds.setdefault(doc["kind"], set()).add(doc["apiVersion"])
    assert kinds == {kind: {version} for kind, version in expected.items()}


# ---------------------------------------------------------------------------------------------------
# KubeRay


def _check_pod_template(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    containers = template["spec"]["containers"]
    assert containers, f"{where}: no containers"
    for container in containers:
        assert container.get("name"), f"{where}: container without a name"
        assert container.get("image"), f"{where}: container {container['name']} has no image"
        resources = container["resources"]
        for side in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[side]), f"{where}: {side} {resources}"
    return containers


def _gpus(container: dict[str, Any]) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _check_ray_cluster_spec(spec: dict[str, Any], where: str) -> None:
    assert spec["rayVersion"] == _ray_version_of_project_images()
    # Token auth as the local stack has it (Ray >= 2.59 default for `ray start --head`).
    assert spec["authOptions"] == {"mode": "token"}, where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_containers = _check_pod_template(head["template"], f"{where} head")
    ports = {p["name"]: p["containerPort"] for p in head_containers[0]["ports"]}
    assert ports["gcs-server"] == 6379 and ports["dashboard"] == 8265, ports
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker groups"
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: duplicate group names {names}"
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
        assert isinstance(group["rayStartParams"], dict)
        containers = _check_pod_template(group["template"], f"{where} group {group['groupName']}")
        gpus = sum(_gpus(c) for c in containers)
        # A GPU group asks for GPUs in limits (KubeRay turns them into --num-gpus) and tolerates
        # the GPU nodes' taint; a CPU group asks for none.
        if group["groupName"] == "gpu":
            assert gpus >= 1
            # GPU nodes run the CUDA image; the CPU image's torch could not use their GPUs.
            assert {c["image"] for c in containers} == {"${FLOWRAY_GPU_IMAGE}"}, where
            for c in containers:
                assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"][
                    "limits"
                ].get("nvidia.com/gpu")
            tolerations = group["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        else:
            assert gpus == 0, f"{where}: CPU group {group['groupName']} asks for GPUs"
            assert {c["image"] for c in containers} == {"${FLOWRAY_IMAGE}"}, where


def test_raycluster_has_a_head_a_cpu_group_and_a_gpu_group():
    cluster = _one("RayCluster", "flowray")
    _check_ray_cluster_spec(cluster["spec"], "raycluster.yaml")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    # The head runs drivers only, so training and scoring land on workers.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def _check_ray_job_spec(spec: dict[str, Any], where: str) -> None:
    assert isinstance(spec["entrypoint"], str) and "python -m jobs." in spec["entrypoint"]
    has_spec, has_selector = "rayClusterSpec" in spec, "clusterSelector" in spec
    assert has_spec != has_selector, f"{where}: needs exactly one of rayClusterSpec/clusterSelector"
    if has_spec:
        _check_ray_cluster_spec(spec["rayClusterSpec"], where)
        # An ephemeral cluster is removed once the job is done.
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
    else:
        cluster = spec["clusterSelector"]["ray.io/cluster"]
        assert cluster in {c["metadata"]["name"] for c in _by_kind("RayCluster")}


def test_train_rayjob_runs_the_train_job_on_its_own_gpu_cluster():
    spec = _one("RayJob", "flowray-train")["spec"]
    _check_ray_job_spec(spec, "rayjob-train.yaml")
    entrypoint = " ".join(spec["entrypoint"].split())
    assert "python -m jobs.train --config jobs/configs/fashion-mnist.yaml" in entrypoint
    # The relative config path needs the image's project directory as working directory.
    workdir = re.findall(r"^WORKDIR (\S+)$", _dockerfile(), re.M)[-1]  # the job image stage
    assert entrypoint.startswith(f"cd {workdir} && ")
    assert "s3://${FLOWRAY_BUCKET}/" in entrypoint
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu"]
    assert groups[0]["replicas"] == 2


SCORE_ARGS = re.compile(
    r"python -m jobs\.score( --model models:/fashion-flow@champion)? "
    r"--input s3://\$\{FLOWRAY_BUCKET\}/\S+ --output s3://\$\{FLOWRAY_BUCKET\}/\S+"
    r"( --fail-on-drift (off|suspected|detected))?"
)


def test_score_rayjob_scores_the_champion_on_the_standing_cluster():
    spec = _one("RayJob", "flowray-score")["spec"]
    _check_ray_job_spec(spec, "rayjob-score.yaml")
    assert spec["clusterSelector"] == {"ray.io/cluster": "flowray"}
    assert SCORE_ARGS.fullmatch(" ".join(spec["entrypoint"].split()))
    assert "@champion" in spec["entrypoint"]  # a person submits this one, by hand


def test_nightly_scoring_is_a_raycronjob_with_a_valid_schedule_and_rayjob_template():
    cron = _one("RayCronJob", "flowray-score-nightly")
    schedule = cron["spec"]["schedule"]
    fields = schedule.split()
    assert len(fields) == 5, schedule
    minute, hour = fields[:2]
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24 and fields[2:] == ["*", "*", "*"]
    template = cron["spec"]["jobTemplate"]
    _check_ray_job_spec(template, "raycronjob-score.yaml")
    assert SCORE_ARGS.fullmatch(" ".join(template["entrypoint"].split()))
    # The growing prefix users drop shards into: each night scores what arrived since the last.
    assert "--input s3://${FLOWRAY_BUCKET}/incoming/ " in template["entrypoint"]
    assert "--model" not in template["entrypoint"]  # the ConfigMap's FLOWRAY_SCORE_MODEL
    assert template["activeDeadlineSeconds"] < 24 * 3600, "a run must end before the next night"


# ---------------------------------------------------------------------------------------------------
# MLflow, config, references between objects


def test_mlflow_deployment_selector_matches_its_pods_and_service():
    deployment = _one("Deployment", "flowray-mlflow")
    spec = deployment["spec"]
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert selector and selector.items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"] == "${FLOWRAY_MLFLOW_IMAGE}"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names == {"http": 5000}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}

    service = _one("Service", "flowray-mlflow")
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http" and port["port"] == 5000
    # The tracking URI the jobs get is this Service.
    config = _one("ConfigMap", "flowray-config")
    assert config["data"]["MLFLOW_TRACKING_URI"] == "http://flowray-mlflow:5000"


def test_mlflow_server_takes_its_database_from_a_secret_and_proxies_artifacts_to_s3():
    container = _one("Deployment", "flowray-mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").split("=", 1) for arg in container["args"])
    assert args["backend-store-uri"] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert args["artifacts-destination"] == "s3://${FLOWRAY_BUCKET}/mlflow-artifacts"
    assert args["host"] == "0.0.0.0" and args["port"] == "5000"
    # Clients reach it by the Service name: that Host header must be allowed.
    assert "flowray-mlflow:5000" in args["allowed-hosts"].split(",")
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "flowray-mlflow-db",
        "key": "uri",
    }
    # Every $(VAR) in args is defined in env (Kubernetes leaves unknown ones as literal text).
    for arg in container["args"]:
        for var in re.findall(r"\$\(([A-Z_]+)\)", arg):
            assert var in env, var


def test_config_and_secret_references_resolve():
    config_maps = {c["metadata"]["name"]: c for c in _by_kind("ConfigMap")}
    readme = KUBERNETES_DOC.read_text()
    for path, doc in _k8s_objects():
        for node in _walk(doc):
            if "configMapRef" in node:
                assert node["configMapRef"]["name"] in config_maps, path
            if "configMapKeyRef" in node:
                ref = node["configMapKeyRef"]
                assert ref["key"] in config_maps[ref["name"]]["data"], (path, ref)
            secret = node.get("secretRef") or node.get("secretKeyRef")
            if secret:
                # Secrets are created by the operator of the deployment (never committed): the
                # Kubernetes guide must say how to create each one.
                assert f"kubectl create secret generic {secret['name']}" in readme, secret
    # flowray-s3 is optional everywhere: pods may use their cloud identity instead of keys.
    for _, doc in _k8s_objects():
        for node in _walk(doc):
            if node.get("secretRef", {}).get("name") == "flowray-s3":
                assert node["secretRef"]["optional"] is True


def test_no_credentials_are_committed():
    assert not _by_kind("Secret"), "Secrets are created with kubectl, not committed"
    for path in [*YAML_FILES, INFRA / "Dockerfile", *SHELL_SCRIPTS]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        # A password in a database URI; <password>-style placeholders in comments are fine.
        assert not re.search(r"postgres(ql)?://[^\s:@/]+:[^\s@$<]+@", text), path
    for _, doc in _k8s_objects():
        for node in _walk(doc):
            for key in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "RAY_AUTH_TOKEN"):
                assert key not in node, f"{key} set literally in {doc['metadata']['name']}"
            if node.get("name") in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
                assert "value" not in node


def _envsubst_vars(text: str) -> set[str]:
    """The variables named in the file's `envsubst '$A $B'` usage line."""
    match = re.search(r"envsubst '([^']*)'", text)
    return set(re.findall(r"\$([A-Z][A-Z0-9_]*)", match.group(1))) if match else set()


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_placeholders_are_rendered_by_the_documented_envsubst_line(path):
    text = path.read_text()
    # Comments show the usage; the placeholders that matter are in the YAML itself.
    used = set(PLACEHOLDER.findall(yaml.safe_dump(_documents(path))))
    assert used == _envsubst_vars(text), f"{path.name}: envsubst line and placeholders differ"
    readme = KUBERNETES_DOC.read_text()
    for var in used:
        assert f"`{var}`" in readme, f"{var} is not documented in docs/kubernetes.md"
    rendered = string.Template(text).safe_substitute({var: "x-" + var.lower() for var in used})
    assert not PLACEHOLDER.search(rendered)
    assert [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc] == [
        doc["kind"] for doc in _documents(path)
    ]


@pytest.mark.skipif(shutil.which("kubeconform") is None, reason="kubeconform is not installed")
def test_kubeconform_accepts_the_rendered_manifests(tmp_path):
    for path in K8S_FILES:
        text = path.read_text()
        values = {var: "x-" + var.lower() for var in PLACEHOLDER.findall(text)}
        (tmp_path / path.name).write_text(string.Template(text).safe_substitute(values))
    # CRDs (ray.io) have no schema in kubeconform's default catalogue: those are skipped there and
    # checked structurally above.
    result = subprocess.run(
        ["kubeconform", "-strict", "-summary", "-ignore-missing-schemas", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------
# One Ray version, one torch pin


def _dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def _ray_version_of_project_images() -> str:
    return re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)", _dockerfile(), re.M).group(1)


def test_one_ray_version_across_images_manifests_and_the_project_pin():
    version = _ray_version_of_project_images()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_spec = re.search(r'"ray\[[^\]]*\]([^"]+)"', pyproject).group(1)
    assert version in SpecifierSet(ray_spec), f"image Ray {version} outside pyproject {ray_spec}"
    installed = importlib.metadata.version("ray")
    assert version.split(".")[:2] == installed.split(".")[:2]
    launcher = yaml.safe_load(LAUNCHER.read_text())
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    versions = {
        node["rayVersion"]
        for _, doc in _k8s_objects()
        for node in _walk(doc)
        if "rayVersion" in node
    }
    assert versions == {version}


def test_dockerfile_pins_torch_like_the_makefile_and_installs_the_project():
    dockerfile = _dockerfile()
    makefile = (ROOT / "Makefile").read_text()
    make_torch = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.M).group(1)
    assert re.search(rf'^ARG TORCH_SPEC="{re.escape(make_torch)}"$', dockerfile, re.M)
    assert re.search(r"^ARG TORCH_INDEX=", dockerfile, re.M)
    assert "RUN pip install --no-cache-dir ." in dockerfile
    stages = re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M)
    # The last stage is the default target: the job image.
    assert stages == ["mlflow-server", "jobs"]
    for package_dir in ("flowmodel", "pipeline", "jobs"):
        assert f"COPY --chown=ray:users {package_dir} ./{package_dir}" in dockerfile


# ---------------------------------------------------------------------------------------------------
# Ray cluster launcher


def test_cluster_launcher_config_has_a_cpu_head_and_a_gpu_worker_group():
    config = yaml.safe_load(LAUNCHER.read_text())
    for key in ("cluster_name", "max_workers", "provider", "auth", "available_node_types"):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    assert isinstance(config["max_workers"], int) and config["max_workers"] >= 1
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        assert node_type["node_config"]["InstanceType"], name
        assert isinstance(node_type["resources"], dict), name
        if name != config["head_node_type"]:
            assert (
                0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
            )
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker type"
    assert "/home/ray/flowray" in config["file_mounts"]
    assert any("pip install" in c and "/home/ray/flowray" in c for c in config["setup_commands"])
    start = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert start.count("RAY_AUTH_MODE=token") == 2


def test_cluster_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    validate_config(prepare_config(config))


# ---------------------------------------------------------------------------------------------------
# Local stack scripts


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(path):
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_is_strict(path):
    text = path.read_text()
    if path.name == "common.sh":
        assert text.startswith("# shellcheck shell=bash")
        return
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/common.sh"' in text


def test_every_makefile_stack_target_has_its_script():
    makefile = (ROOT / "Makefile").read_text()
    scripts = set(re.findall(r"bash infra/local/([a-z0-9-]+\.sh)", makefile))
    assert scripts == {
        f"{service}-{action}.sh"
        for service in ("cluster", "s3", "mlflow")
        for action in ("up", "down")
    }
    for name in scripts:
        assert (LOCAL / name).is_file(), name


def test_docker_build_context_holds_only_what_the_image_copies():
    # BuildKit reads infra/Dockerfile.dockerignore for `docker build -f infra/Dockerfile .`: it
    # excludes everything, then lets through exactly the paths the Dockerfile COPYs, so .venv,
    # .stack, demo-work and data never reach the build context.
    rules = [
        line
        for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "**"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", _dockerfile(), re.M):
        copied |= set(sources.split())
    assert copied == {"pyproject.toml", "README.md", "flowmodel", "pipeline", "jobs"}
    assert allowed == copied
