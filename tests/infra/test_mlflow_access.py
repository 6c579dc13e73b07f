"""Who reaches the MLflow server and which model the nightly job scores, checked in the manifests:
a NetworkPolicy admits only flowray's Ray pods to the tracking server's port, and the RayCronJob
scores the model pinned in the ConfigMap rather than whatever @champion points at.

(Beside test_manifests.py, which holds the structural checks of every file.)
"""

from __future__ import annotations

from typing import Any

from tests.infra.test_manifests import KUBERNETES_DOC, _by_kind, _one

CLIENT_LABEL = ("flowray.io/mlflow-client", "true")


def _ray_pod_templates() -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every Ray pod the manifests create."""
    specs = [(f"RayCluster {c['metadata']['name']}", c["spec"]) for c in _by_kind("RayCluster")]
    specs += [
        (f"RayJob {j['metadata']['name']}", j["spec"]["rayClusterSpec"])
        for j in _by_kind("RayJob")
        if "rayClusterSpec" in j["spec"]
    ]
    specs += [
        (f"RayCronJob {c['metadata']['name']}", c["spec"]["jobTemplate"]["rayClusterSpec"])
        for c in _by_kind("RayCronJob")
    ]
    templates = []
    for where, spec in specs:
        templates.append((f"{where} head", spec["headGroupSpec"]["template"]))
        for group in spec["workerGroupSpecs"]:
            templates.append((f"{where} group {group['groupName']}", group["template"]))
    return templates


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector  # no matchExpressions to evaluate here
    return selector["matchLabels"].items() <= labels.items()


def test_only_ray_pods_reach_the_mlflow_server_and_only_on_its_port():
    policy = _one("NetworkPolicy", "flowray-mlflow")["spec"]
    server = _one("Deployment", "flowray-mlflow")["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["podSelector"], server)
    assert policy["policyTypes"] == ["Ingress"]  # the server's own requests (S3, DB) stay open
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 5000}]
    (source,) = rule["from"]  # a pod selector alone: this namespace's pods, no ipBlock
    assert set(source) == {"podSelector"}
    # Every Ray pod is admitted (the drivers and workers log to MLflow) ...
    templates = _ray_pod_templates()
    assert len(templates) == 7, [where for where, _ in templates]
    for where, template in templates:
        labels = template.get("metadata", {}).get("labels", {})
        assert _selects(source["podSelector"], labels), f"{where} cannot reach MLflow"
    # ... and a pod without the label, or the server's own, is not.
    assert not _selects(source["podSelector"], {"app.kubernetes.io/part-of": "flowray"})
    assert not _selects(source["podSelector"], server)
    assert dict([CLIENT_LABEL]) == source["podSelector"]["matchLabels"]


def test_the_nightly_job_scores_the_model_pinned_in_the_configmap():
    cron = _one("RayCronJob", "flowray-score-nightly")["spec"]["jobTemplate"]
    assert "--model" not in cron["entrypoint"] and "@champion" not in cron["entrypoint"]
    config = _one("ConfigMap", "flowray-config")["data"]
    assert config["FLOWRAY_SCORE_MODEL"] == "${FLOWRAY_SCORE_MODEL}"
    head = cron["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "flowray-config"}} in head["envFrom"]
    readme = KUBERNETES_DOC.read_text()
    assert "`FLOWRAY_SCORE_MODEL`" in readme and "NetworkPolicy" in readme


def test_the_score_job_takes_its_model_from_the_variable_the_configmap_sets(monkeypatch):
    from jobs import score

    args = score.parser().parse_args(["--input", "x", "--output", "y"])
    monkeypatch.setenv(score.MODEL_VARIABLE, "models:/fashion-flow/7")
    assert score.model_option(args) == "models:/fashion-flow/7"
    # The command line wins: --model, or --set model=...
    args = score.parser().parse_args(["--model", "models:/m/1"])
    assert score.model_option(args) == "models:/m/1"
    args = score.parser().parse_args(["--set", "model=models:/m/2"])
    assert score.model_option(args) is None  # left to --set
