"""``conveyor deploy k8s``: manifests valid against the Kubernetes schemas
(kubernetes-validate) and KEDA's ScaledObject / TriggerAuthentication fields, every stage
and shard present, and KEDA and the controller never owning the same thing."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.app.cli import main
from conveyor.app.deploy.k8s import write_k8s
from conveyor.app.deploy.stack import HEALTH_PATH
from conveyor.plan import Plan
from tests.deploy.conftest import chain_plan, join_plan

#: The fields of KEDA's CRDs (keda.sh/v1alpha1) the generator uses, written from the CRD's
#: openAPIV3Schema: types and required fields (a structural check; kubernetes-validate
#: knows no custom resources).
_INT = {"type": "integer", "minimum": 0}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {
                "type": "object", "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {"type": "object", "required": ["name"],
                                       "properties": {"name": {"type": "string"}}},
                    "minReplicaCount": _INT, "maxReplicaCount": _INT,
                    "pollingInterval": _INT, "cooldownPeriod": _INT,
                    "triggers": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": {"type": "object",
                                         "additionalProperties": {"type": "string"}},
                            "authenticationRef": {"type": "object", "required": ["name"]},
                        }}},
                }},
        }},
    "TriggerAuthentication": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "spec": {"type": "object", "properties": {"secretTargetRef": {
                "type": "array", "items": {"type": "object",
                                           "required": ["parameter", "name", "key"]}}}},
        }},
}


def _objects(out: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(out.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture
def four(tmp_path: Path) -> tuple[Plan, list[dict[str, Any]]]:
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    for stage in join_plan().stages:
        (plan_dir / stage.file).write_bytes(b"onnx")  # the generator never parses them
    plan = join_plan(workers=2).save(plan_dir)
    write_k8s(plan, tmp_path / "k8s", max_scale=4)
    return plan, _objects(tmp_path / "k8s")


def test_manifests_validate_against_the_kubernetes_and_keda_schemas(
    four: tuple[Plan, list[dict[str, Any]]],
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    import jsonschema

    _, objects = four
    kinds = set()
    for obj in objects:
        kinds.add(obj["kind"])
        if obj["kind"] in KEDA_SCHEMAS:
            jsonschema.validate(obj, KEDA_SCHEMAS[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, "1.30.0", strict=True)
    assert {"Namespace", "Secret", "ConfigMap", "Job", "Deployment", "ScaledObject",
            "TriggerAuthentication"} <= kinds


def test_a_schema_violation_is_caught(four: tuple[Plan, list[dict[str, Any]]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from kubernetes_validate.utils import ValidationError

    _, objects = four
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "three"}}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_every_stage_and_shard_has_a_deployment_with_probes_and_requests(
    four: tuple[Plan, list[dict[str, Any]]],
) -> None:
    plan, objects = four
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"stage-head", "stage-left", "stage-right", "stage-join-shard-0",
                                "stage-join-shard-1", "controller", "gateway"}
    heavy = deployments["stage-left"]["spec"]["template"]["spec"]["containers"][0]
    light = deployments["stage-join-shard-0"]["spec"]["template"]["spec"]["containers"][0]
    for c in (heavy, light):
        assert c["readinessProbe"]["httpGet"]["path"] == HEALTH_PATH
        assert c["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "worker-url"

    def mib(c: dict[str, Any]) -> int:
        return int(c["resources"]["requests"]["memory"].removesuffix("Mi"))

    # requests follow the plan's cost estimates: left holds more weights than join
    assert mib(heavy) > mib(light)
    assert plan.stage("left").cost.param_bytes > plan.stage("join").cost.param_bytes


def test_keda_owns_replicas_and_the_controller_prefetch_and_bindings(
    four: tuple[Plan, list[dict[str, Any]]],
) -> None:
    plan, objects = four
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects
              if o["kind"] == "ScaledObject"}
    assert set(scaled) == {"stage-head", "stage-left", "stage-right"}  # join shards: fixed
    for name, so in scaled.items():
        # a Deployment under KEDA carries no replicas, so re-applying never resets KEDA's
        assert "replicas" not in deployments[name]["spec"]
        stage = name.removeprefix("stage-")
        workers = plan.scheduling.for_stage(stage).workers
        assert so["spec"]["minReplicaCount"] == workers
        assert so["spec"]["maxReplicaCount"] == 4 * workers
        assert all(t["type"] == "rabbitmq" and t["metadata"]["mode"] == "QueueLength"
                   for t in so["spec"]["triggers"])
    for i in (0, 1):
        assert deployments[f"stage-join-shard-{i}"]["spec"]["replicas"] == 1
    # every worker hosts exactly one stage: the controller's flexible-worker lever (the one
    # that would move workers between KEDA-scaled Deployments) has nothing to move
    for name, d in deployments.items():
        command = d["spec"]["template"]["spec"]["containers"][0]["command"]
        if name.startswith("stage-"):
            assert command.count("--stage") == 1 and "--no-declare" in command
    controller = deployments["controller"]["spec"]
    assert controller["replicas"] == 1 and controller["strategy"]["type"] == "Recreate"


def test_the_secret_is_mode_600_and_the_cli_writes_it_all(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    plan = chain_plan(tmp_path / "plan")
    assert main(["deploy", "k8s", str(plan.directory), "--out", str(tmp_path / "k8s")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert stat.S_IMODE((tmp_path / "k8s" / "01-secret.yaml").stat().st_mode) == 0o600
    configmap = next(o for o in _objects(tmp_path / "k8s") if o["kind"] == "ConfigMap")
    assert set(configmap["binaryData"]) == {"a.onnx", "b.onnx"}
    assert "plan.json" in configmap["data"]


def test_the_gateway_gets_a_deployment_and_a_service_once_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    from conveyor.app.deploy import stack

    monkeypatch.setattr(stack, "has_gateway", lambda: True)
    plan = chain_plan(tmp_path / "plan")
    write_k8s(plan, tmp_path / "k8s")
    objects = [o for o in _objects(tmp_path / "k8s") if o["metadata"]["name"] == "gateway"]
    assert {o["kind"] for o in objects} == {"Deployment", "Service"}
    for obj in objects:
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["key"] == "client-url"
