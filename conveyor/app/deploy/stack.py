"""The processes a plan needs, for every generated stack (compose, Kubernetes).

One service per stage; a join stage's shards are services of their own (each join worker
owns one shard queue and needs its own ``--shard I``, which replicas cannot give). Every
worker hosts exactly one stage, so the controller's flexible-worker lever never moves one:
replicas belong to compose or KEDA, prefetch and partition bindings to the controller
(docs/deploy.md, "Who owns what").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from conveyor.errors import ConfigError
from conveyor.plan import Plan, StageCost, StageSpec
from conveyor.topology import Topology
from conveyor.topology_setup import join_shards, stage_queues

#: Where the plan directory is mounted in every container.
PLAN_MOUNT = "/plan"
#: Port of ``/metrics`` and ``/v2/health/ready`` in every Conveyor container.
METRICS_PORT = 9100
HEALTH_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"
CONTROLLER_POLICY = "hybrid"


def service_name(*parts: str) -> str:
    """A name valid for compose services and Kubernetes objects (DNS-1123 label)."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if not name:
        raise ConfigError(f"cannot make a service name from {parts!r}")
    return name[:63].rstrip("-")


@dataclass(frozen=True)
class StageProcess:
    """One deployable unit: a stage (or one shard of a join stage)."""

    service: str
    stage: str
    shard: int | None
    #: Replicas from the plan's static schedule (1 for a join shard).
    replicas: int
    #: Queues this service consumes (the KEDA trigger's queues).
    queues: tuple[str, ...]
    cost: StageCost
    prefetch: int
    gpu: bool

    @property
    def autoscaled(self) -> bool:
        """Join shards stay at one replica: one worker owns one shard queue."""
        return self.shard is None

    def command(self) -> list[str]:
        args = ["conveyor", "worker", PLAN_MOUNT, "--stage", self.stage,
                "--device", "cuda" if self.gpu else "cpu",
                "--durable", "--no-declare", "--metrics-port", str(METRICS_PORT)]
        if self.shard is not None:
            args += ["--shard", str(self.shard)]
        return args


def _gpu_stages(plan: Plan, gpu: bool, only: tuple[str, ...]) -> set[str]:
    for name in only:
        plan.stage(name)  # PlanError naming the stages it has
    if only:
        return set(only)
    return set(plan.stage_names) if gpu else set()


def stage_processes(
    plan: Plan, *, gpu: bool = False, gpu_stages: tuple[str, ...] = ()
) -> list[StageProcess]:
    """Every stage service of ``plan``: ``stage-<name>`` or ``stage-<name>-shard-<i>``."""
    wants_gpu = _gpu_stages(plan, gpu, gpu_stages)
    topo = Topology.of(plan)
    out: list[StageProcess] = []
    for stage in plan.stages:
        sched = plan.scheduling.for_stage(stage.name)
        def make(service: str, shard: int | None, replicas: int, queues: list[str],
                 stage: StageSpec = stage, prefetch: int = sched.prefetch) -> StageProcess:
            return StageProcess(service=service, stage=stage.name, shard=shard,
                                replicas=replicas, queues=tuple(queues), cost=stage.cost,
                                prefetch=prefetch, gpu=stage.name in wants_gpu)

        if _is_sharded_join(plan, stage):
            out += [make(service_name("stage", stage.name, "shard", str(i)), i, 1,
                         [topo.stage_queue(stage.name, i)])
                    for i in range(join_shards(plan, stage))]
        else:
            out.append(make(service_name("stage", stage.name), None, max(1, sched.workers),
                            stage_queues(plan, stage)))
    names = [p.service for p in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names of plan {plan.name!r} map to the same service: {names}")
    return out


def _is_sharded_join(plan: Plan, stage: StageSpec) -> bool:
    return stage.is_join and stage.name != plan.stages[0].name


def controller_command() -> list[str]:
    return ["conveyor", "controller", PLAN_MOUNT, "--durable", "--policy", CONTROLLER_POLICY,
            "--metrics-port", str(METRICS_PORT)]


GATEWAY_PORT = 8000


def has_gateway() -> bool:
    """True where ``conveyor gateway`` exists (issue 14): the stacks include it then."""
    import importlib.util

    return importlib.util.find_spec("conveyor.app.cmd_gateway") is not None


def gateway_command() -> list[str]:
    # its /metrics and /v2/health/* are on its own port
    return ["conveyor", "gateway", PLAN_MOUNT, "--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
            "--durable", "--no-declare"]


def topology_command(queue_type: str) -> list[str]:
    return ["conveyor", "topology", PLAN_MOUNT, "--durable", "--queue-type", queue_type]


def memory_request_mib(cost: StageCost) -> int:
    """Memory a replica asks for: the runtime (256 MiB) and three copies of the weights
    (the model file, onnxruntime's initialized tensors, its arena), in MiB."""
    return 256 + math.ceil(3 * cost.param_bytes / 2**20)


def cpu_request_millis(cost: StageCost) -> int:
    """CPU a replica asks for: half a core, plus up to one and a half by its cost share."""
    return 500 + round(1500 * max(0.0, min(1.0, cost.share)))


def queue_type_of(plan: Plan, override: str | None) -> str:
    """Generated stacks default to quorum queues unless the plan or the caller says."""
    return override or plan.queues.type or "quorum"
