"""``conveyor deploy k8s``: Kubernetes manifests for a plan, autoscaled by KEDA.

Files written into ``out`` (apply them with ``kubectl apply -f out``):

* ``00-namespace.yaml``; ``01-secret.yaml`` (mode 600: the amqp:// URL of each role);
  ``02-plan.yaml``: the plan as a ConfigMap (plan.json and the stage files, binary) when it
  fits in one (1 MiB), else a PersistentVolumeClaim ``conveyor-plan`` to fill by hand.
* ``10-topology-job.yaml``: the admin step (``conveyor topology``) as a Job.
* ``20-stage-<name>.yaml``: a Deployment per stage, one per shard of a join stage; probes on
  ``/v2/health/ready``; resource requests from the plan's cost estimates
  (``stack.cpu_request_millis`` / ``memory_request_mib``).
* ``30-controller.yaml``: the controller (one replica, ``Recreate``); ``35-gateway.yaml``:
  the HTTP gateway and its Service, once ``conveyor gateway`` exists.
* ``40-keda.yaml``: a TriggerAuthentication and one ``ScaledObject`` per stage on its
  queues' length (the RabbitMQ scaler), from the plan's workers to ``max_scale`` times them.
* ``rabbitmq-definitions.json``: the users of ``conveyor users`` for the broker.

Who owns what: KEDA owns the replicas of every stage Deployment (they carry no
``spec.replicas``, so re-applying never fights it); the controller owns prefetch and the
partition bindings and never changes replicas; each worker hosts one stage, so the
controller's flexible-worker lever has nothing to move. A join shard's Deployment stays at
one replica (one worker owns one shard queue) and has no ScaledObject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conveyor.app.deploy import stack
from conveyor.app.deploy.secrets import role_passwords, write_private
from conveyor.app.deploy.users import ROLES, definitions_json
from conveyor.plan import PLAN_FILE, Plan

IMAGE = "conveyor:cpu"
APP = "conveyor"
SECRET = "conveyor-amqp"
PLAN_CONFIGMAP = "conveyor-plan"
#: ConfigMaps hold at most 1 MiB; leave room for the object itself.
CONFIGMAP_LIMIT = 900 * 1024
USER_ID = 10001


def _meta(name: str, namespace: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace,
            "labels": {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component}}


def _plan_volume(plan_fits: bool) -> dict[str, Any]:
    if plan_fits:
        return {"name": "plan", "configMap": {"name": PLAN_CONFIGMAP}}
    return {"name": "plan", "persistentVolumeClaim": {"claimName": PLAN_CONFIGMAP,
                                                      "readOnly": True}}


def _container(name: str, role: str, command: list[str], *, probes: bool) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "command": command,
        "env": [{"name": "CONVEYOR_AMQP_URL",
                 "valueFrom": {"secretKeyRef": {"name": SECRET, "key": f"{role}-url"}}}],
        "volumeMounts": [{"name": "plan", "mountPath": stack.PLAN_MOUNT, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False},
    }
    if probes:
        c["ports"] = [{"name": "metrics", "containerPort": stack.METRICS_PORT}]
        c["readinessProbe"] = {"httpGet": {"path": stack.HEALTH_PATH, "port": "metrics"},
                               "periodSeconds": 5, "failureThreshold": 3}
        # liveness: the process answers HTTP at all (not ready during a broker outage is
        # no reason to restart it)
        c["livenessProbe"] = {"httpGet": {"path": "/metrics", "port": "metrics"},
                              "initialDelaySeconds": 30, "periodSeconds": 10,
                              "failureThreshold": 6}
    return c


def _pod(containers: list[dict[str, Any]], plan_fits: bool, restart: str = "Always"
         ) -> dict[str, Any]:
    return {
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID},
        "restartPolicy": restart,
        "containers": containers,
        "volumes": [_plan_volume(plan_fits)],
    }


def _deployment(name: str, ns: str, component: str, pod: dict[str, Any],
                replicas: int | None, strategy: str = "RollingUpdate") -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": APP, "app.kubernetes.io/instance": name}
    spec: dict[str, Any] = {
        "selector": {"matchLabels": labels},
        "strategy": {"type": strategy},
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(name, ns, component), "spec": spec}


def stage_deployment(p: stack.StageProcess, ns: str, plan_fits: bool) -> dict[str, Any]:
    container = _container("worker", "worker", p.command(), probes=True)
    container["resources"] = {"requests": {
        "cpu": f"{stack.cpu_request_millis(p.cost)}m",
        "memory": f"{stack.memory_request_mib(p.cost)}Mi"}}
    # a KEDA-scaled Deployment carries no replicas: applying it again never resets KEDA's
    replicas = None if p.autoscaled else 1
    return _deployment(p.service, ns, "stage", _pod([container], plan_fits), replicas)


def scaled_object(p: stack.StageProcess, ns: str, max_scale: int) -> dict[str, Any]:
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(p.service, ns, "autoscaling"),
        "spec": {
            "scaleTargetRef": {"name": p.service},
            "minReplicaCount": p.replicas,
            "maxReplicaCount": p.replicas * max_scale,
            "pollingInterval": 5,
            "cooldownPeriod": 120,
            "triggers": [
                {"type": "rabbitmq",
                 "metadata": {"protocol": "amqp", "queueName": queue, "mode": "QueueLength",
                              # one replica's worth of backlog: what its prefetch holds
                              "value": str(p.prefetch), "vhostName": "/"},
                 "authenticationRef": {"name": "conveyor-rabbitmq"}}
                for queue in p.queues
            ],
        },
    }


def _gateway(ns: str, plan_fits: bool) -> list[dict[str, Any]]:
    """The HTTP gateway (issue 14) as the client user, with a Service in front."""
    container = _container("gateway", "client", stack.gateway_command(), probes=True)
    # the gateway serves /metrics and the health paths on its HTTP port
    container["ports"] = [{"name": "http", "containerPort": stack.GATEWAY_PORT}]
    for probe in ("readinessProbe", "livenessProbe"):
        container[probe]["httpGet"]["port"] = "http"
    container["resources"] = {"requests": {"cpu": "250m", "memory": "256Mi"}}
    deployment = _deployment("gateway", ns, "gateway", _pod([container], plan_fits), 2)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta("gateway", ns, "gateway"),
               "spec": {"selector": deployment["spec"]["selector"]["matchLabels"],
                        "ports": [{"name": "http", "port": stack.GATEWAY_PORT,
                                   "targetPort": "http"}]}}
    return [deployment, service]


def _trigger_auth(ns: str) -> dict[str, Any]:
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
            "metadata": _meta("conveyor-rabbitmq", ns, "autoscaling"),
            "spec": {"secretTargetRef": [
                {"parameter": "host", "name": SECRET, "key": "controller-url"}]}}


def _plan_objects(plan: Plan, ns: str) -> tuple[bool, dict[str, Any]]:
    assert plan.directory is not None, "Plan.load sets the directory"
    files = [PLAN_FILE, *(s.file for s in plan.stages)]
    sizes = sum((plan.directory / f).stat().st_size for f in files)
    if sizes <= CONFIGMAP_LIMIT and all("/" not in f for f in files):
        import base64

        binary = {s.file: base64.b64encode((plan.directory / s.file).read_bytes()).decode()
                  for s in plan.stages}
        return True, {"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": _meta(PLAN_CONFIGMAP, ns, "plan"),
                      "data": {PLAN_FILE: (plan.directory / PLAN_FILE).read_text()},
                      "binaryData": binary}
    return False, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": _meta(PLAN_CONFIGMAP, ns, "plan"),
                   "spec": {"accessModes": ["ReadOnlyMany"],
                            "resources": {"requests": {"storage": f"{sizes * 2 // 2**20 + 64}Mi"}}}}


def manifests(plan: Plan, passwords: dict[str, str], *, namespace: str = "conveyor",
              max_scale: int = 4, queue_type: str | None = None,
              broker_host: str = "rabbitmq") -> dict[str, list[dict[str, Any]]]:
    """file name -> the Kubernetes objects in it."""
    ns = namespace
    fits, plan_object = _plan_objects(plan, ns)
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
              "metadata": _meta(SECRET, ns, "credentials"),
              "stringData": {f"{role}-url": f"amqp://conveyor-{role}:{passwords[role]}"
                                            f"@{broker_host}:5672/%2F" for role in ROLES}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("topology", ns, "setup"),
           "spec": {"backoffLimit": 10, "template": {"spec": _pod(
               [_container("topology", "admin", stack.topology_command(
                   stack.queue_type_of(plan, queue_type)), probes=False)],
               fits, restart="OnFailure")}}}
    controller = _container("controller", "controller", stack.controller_command(), probes=True)
    controller["resources"] = {"requests": {"cpu": "100m", "memory": "128Mi"}}
    out: dict[str, list[dict[str, Any]]] = {
        "00-namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": ns}}],
        "01-secret.yaml": [secret],
        "02-plan.yaml": [plan_object],
        "10-topology-job.yaml": [job],
        "30-controller.yaml": [_deployment("controller", ns, "controller",
                                           _pod([controller], fits), 1, "Recreate")],
    }
    if stack.has_gateway():
        out["35-gateway.yaml"] = _gateway(ns, fits)
    processes = stack.stage_processes(plan)
    for p in processes:
        out[f"20-{p.service}.yaml"] = [stage_deployment(p, ns, fits)]
    out["40-keda.yaml"] = [_trigger_auth(ns)] + [
        scaled_object(p, ns, max_scale) for p in processes if p.autoscaled]
    return out


def write_k8s(plan: Plan, out: Path, *, namespace: str = "conveyor", max_scale: int = 4,
              queue_type: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    passwords = role_passwords(out / "secrets", ROLES)
    written: list[Path] = []
    for name, objects in manifests(plan, passwords, namespace=namespace, max_scale=max_scale,
                                   queue_type=queue_type).items():
        text = yaml.safe_dump_all(objects, sort_keys=False, width=100)
        path = out / name
        if any(o["kind"] == "Secret" for o in objects):
            write_private(path, text)
        else:
            path.write_text(text)
        written.append(path)
    defs = out / "rabbitmq-definitions.json"
    defs.write_text(definitions_json(plan, passwords))
    return [*written, defs, *sorted((out / "secrets").iterdir())]
