"""The control plane's contract: heartbeats, commands and the partition map (docs/scheduling.md).

Workers and the controller talk over the plan's control exchange (``Topology.
control_exchange``, a topic exchange):

=======================  =====================  =========================================
routing key              body                   who publishes / who reads
=======================  =====================  =========================================
``heartbeat.<worker>``   ``Heartbeat``          every worker, every period / the controller
``command.<worker>``     ``Command``            the controller / that worker only
``partitions``           ``PartitionMap``       the controller, after every partition move /
                                                its own retained-state queue (a restarted
                                                controller reads it back)
=======================  =====================  =========================================

Every body is one msgpack map ``{"v": 1, "type": ..., ...}`` (no pickle, no extension
types), so any language can read and write the control plane. ``decode_*`` validates
every field and raises ``CodecError`` naming the first thing that is wrong.

A worker is controllable when it implements ``Controllable``: a ``snapshot()`` of its
figures and three commands. ``workers.control.agent.ControlAgent`` turns that into
heartbeats and obeys commands on its behalf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgpack

from conveyor.errors import CodecError

CONTROL_VERSION = 1
#: Routing key of the controller's partition map on the control exchange.
PARTITIONS_KEY = "partitions"
#: Upper bound of a control message; heartbeats of a busy worker stay far below it.
MAX_CONTROL_BYTES = 1 << 20

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# what a worker reports


@dataclass(frozen=True)
class QueueConsumption:
    """One queue a worker consumes, for which stage, with which prefetch."""

    queue: str
    stage: str
    prefetch: int


@dataclass(frozen=True)
class StageStats:
    """A worker's figures for one stage it runs (recent values are moving averages)."""

    stage: str
    #: Cumulative counters since the worker started.
    requests: int = 0
    batches: int = 0
    errors: int = 0
    #: Requests of this stage being worked on now (taken from the queue, not yet acked).
    in_flight: int = 0
    #: Recent service time per request (per batch divided by its rows), seconds.
    service_s_per_request: float = 0.0
    #: Recent service time per batch, seconds.
    service_s_per_batch: float = 0.0
    #: Recent mean and largest batch size (rows).
    mean_batch: float = 0.0
    max_batch: int = 0

    @property
    def capacity_rps(self) -> float:
        """Requests per second this worker can serve on this stage (0 when unmeasured)."""
        return 1.0 / self.service_s_per_request if self.service_s_per_request > 0 else 0.0


@dataclass(frozen=True)
class WorkerStats:
    """What ``Controllable.snapshot()`` returns: the figures of one worker right now."""

    #: Stages this worker has loaded and can run (more than one: a flexible worker).
    stages_available: tuple[str, ...]
    #: Stages the worker was started to serve; a moved flexible worker goes back to these.
    home_stages: tuple[str, ...]
    consuming: tuple[QueueConsumption, ...] = ()
    stages: tuple[StageStats, ...] = ()
    #: Cumulative deliveries per input routing key (``p.N`` / ``r.i``) of input shards, so
    #: the controller can find hot partitions; empty for non-entry workers.
    routing_keys: Mapping[str, int] = field(default_factory=dict)
    #: The onnxruntime execution provider actually used ("CPUExecutionProvider", ...).
    provider: str = ""

    @property
    def in_flight(self) -> int:
        return sum(s.in_flight for s in self.stages)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.stages)

    def stage(self, name: str) -> StageStats | None:
        for s in self.stages:
            if s.stage == name:
                return s
        return None


@dataclass(frozen=True)
class CommandResult:
    """How a worker applied one command (carried in its heartbeats)."""

    command_id: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class Heartbeat:
    worker_id: str
    #: Random per worker process start: a new value means the worker restarted.
    incarnation: str
    seq: int
    sent_at: float
    period_s: float
    stats: WorkerStats
    #: Results of the most recent commands (a window, so a lost heartbeat loses nothing).
    acks: tuple[CommandResult, ...] = ()


# ---------------------------------------------------------------------------------------
# what the controller sends


class CommandKind(StrEnum):
    SET_PREFETCH = "set_prefetch"
    START_CONSUMING = "start_consuming"
    STOP_CONSUMING = "stop_consuming"


@dataclass(frozen=True)
class Command:
    """An order for one worker. ``set_prefetch`` needs ``queue`` and ``prefetch`` >= 1;
    ``start_consuming``/``stop_consuming`` need ``stage`` (``queue`` defaults to the
    stage's queue)."""

    id: str
    worker_id: str
    kind: CommandKind
    stage: str | None = None
    queue: str | None = None
    prefetch: int | None = None
    issued_at: float = 0.0
    #: Why the controller sent it, with the figures (for the worker's log).
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind is CommandKind.SET_PREFETCH:
            if not self.queue or self.prefetch is None or self.prefetch < 1:
                raise CodecError(
                    f"command {self.id}: set_prefetch needs a queue and a prefetch >= 1, "
                    f"got queue={self.queue!r} prefetch={self.prefetch!r}"
                )
        elif not self.stage:
            raise CodecError(f"command {self.id}: {self.kind.value} needs a stage")


@dataclass(frozen=True)
class PartitionMap:
    """Where the controller routes each input routing key: key -> shard queue.

    Only keys the controller moved away from their initial shard need to be listed; the
    others stay where ``conveyor.topology.initial_bindings`` put them."""

    epoch: int
    exchange: str
    assignments: Mapping[str, str]
    issued_at: float = 0.0
    reason: str = ""


# ---------------------------------------------------------------------------------------
# the worker side of commands


@runtime_checkable
class Controllable(Protocol):
    """What a worker offers the control plane. Commands raise ``ConveyorError`` subclasses
    (e.g. ``ConfigError`` for a stage the worker cannot run) when they cannot be applied."""

    def snapshot(self) -> WorkerStats: ...
    async def set_prefetch(self, queue: str, prefetch: int) -> None: ...
    async def start_consuming(self, stage: str, queue: str | None = None) -> None: ...
    async def stop_consuming(self, stage: str, queue: str | None = None) -> None: ...


# ---------------------------------------------------------------------------------------
# codec


def _pack(kind: str, body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb({"v": CONTROL_VERSION, "type": kind, **body}, use_bin_type=True)
    return packed


def encode_heartbeat(hb: Heartbeat) -> bytes:
    s = hb.stats
    return _pack(
        "heartbeat",
        {
            "worker_id": hb.worker_id,
            "incarnation": hb.incarnation,
            "seq": hb.seq,
            "sent_at": hb.sent_at,
            "period_s": hb.period_s,
            "stages_available": list(s.stages_available),
            "home_stages": list(s.home_stages),
            "consuming": [[c.queue, c.stage, c.prefetch] for c in s.consuming],
            "stages": [
                {
                    "stage": st.stage,
                    "requests": st.requests,
                    "batches": st.batches,
                    "errors": st.errors,
                    "in_flight": st.in_flight,
                    "service_s_per_request": st.service_s_per_request,
                    "service_s_per_batch": st.service_s_per_batch,
                    "mean_batch": st.mean_batch,
                    "max_batch": st.max_batch,
                }
                for st in s.stages
            ],
            "routing_keys": dict(s.routing_keys),
            "provider": s.provider,
            "acks": [[a.command_id, a.ok, a.detail] for a in hb.acks],
        },
    )


def encode_command(cmd: Command) -> bytes:
    return _pack(
        "command",
        {
            "id": cmd.id,
            "worker_id": cmd.worker_id,
            "kind": cmd.kind.value,
            "stage": cmd.stage,
            "queue": cmd.queue,
            "prefetch": cmd.prefetch,
            "issued_at": cmd.issued_at,
            "reason": cmd.reason,
        },
    )


def encode_partition_map(pm: PartitionMap) -> bytes:
    return _pack(
        "partition_map",
        {
            "epoch": pm.epoch,
            "exchange": pm.exchange,
            "assignments": dict(pm.assignments),
            "issued_at": pm.issued_at,
            "reason": pm.reason,
        },
    )


def message_type(body: bytes) -> str:
    """The ``type`` of a control message ("heartbeat", "command", "partition_map")."""
    return _str(_unpack(body), "type")


def decode_heartbeat(body: bytes) -> Heartbeat:
    d = _unpack(body, "heartbeat")
    try:
        stages = tuple(_stage_stats(_map(x, "stages[]")) for x in _list(d, "stages"))
        consuming = tuple(
            QueueConsumption(_s(c[0], "queue"), _s(c[1], "stage"), _i(c[2], "prefetch"))
            for c in (_seq(x, "consuming[]", 3) for x in _list(d, "consuming"))
        )
        acks = tuple(
            CommandResult(_s(a[0], "ack id"), _b(a[1], "ack ok"), _s(a[2], "ack detail"))
            for a in (_seq(x, "acks[]", 3) for x in _list(d, "acks"))
        )
        routing = {
            _s(k, "routing key"): _i(v, "routing key count")
            for k, v in _map(d.get("routing_keys", {}), "routing_keys").items()
        }
        stats = WorkerStats(
            stages_available=tuple(_s(x, "stage") for x in _list(d, "stages_available")),
            home_stages=tuple(_s(x, "stage") for x in _list(d, "home_stages")),
            consuming=consuming,
            stages=stages,
            routing_keys=routing,
            provider=_str(d, "provider"),
        )
        return Heartbeat(
            worker_id=_str(d, "worker_id"),
            incarnation=_str(d, "incarnation"),
            seq=_int(d, "seq"),
            sent_at=_float(d, "sent_at"),
            period_s=_float(d, "period_s"),
            stats=stats,
            acks=acks,
        )
    except (IndexError, TypeError) as exc:
        raise CodecError(f"malformed heartbeat: {exc}") from exc


def decode_command(body: bytes) -> Command:
    d = _unpack(body, "command")
    kind_text = _str(d, "kind")
    try:
        kind = CommandKind(kind_text)
    except ValueError as exc:
        raise CodecError(f"unknown command kind {kind_text!r}") from exc
    return Command(
        id=_str(d, "id"),
        worker_id=_str(d, "worker_id"),
        kind=kind,
        stage=_opt(d, "stage", _s),
        queue=_opt(d, "queue", _s),
        prefetch=_opt(d, "prefetch", _i),
        issued_at=_float(d, "issued_at"),
        reason=_str(d, "reason"),
    )


def decode_partition_map(body: bytes) -> PartitionMap:
    d = _unpack(body, "partition_map")
    return PartitionMap(
        epoch=_int(d, "epoch"),
        exchange=_str(d, "exchange"),
        assignments={
            _s(k, "routing key"): _s(v, "queue")
            for k, v in _map(d.get("assignments"), "assignments").items()
        },
        issued_at=_float(d, "issued_at"),
        reason=_str(d, "reason"),
    )


# -- validation helpers -----------------------------------------------------------------


def _unpack(body: bytes, expect: str | None = None) -> dict[str, Any]:
    if len(body) > MAX_CONTROL_BYTES:
        raise CodecError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL_BYTES}")
    try:
        d = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CodecError(f"control message is not valid msgpack: {exc}") from exc
    if not isinstance(d, dict):
        raise CodecError(f"control message must be a map, got {type(d).__name__}")
    if d.get("v") != CONTROL_VERSION:
        raise CodecError(f"control message version {d.get('v')!r}; expected {CONTROL_VERSION}")
    if expect is not None and d.get("type") != expect:
        raise CodecError(f"expected a {expect} message, got type {d.get('type')!r}")
    return d


def _s(v: object, what: str) -> str:
    if not isinstance(v, str):
        raise CodecError(f"{what} must be a string, got {type(v).__name__}")
    return v


def _i(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise CodecError(f"{what} must be an integer, got {type(v).__name__}")
    return v


def _f(v: object, what: str) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise CodecError(f"{what} must be a number, got {type(v).__name__}")
    return float(v)


def _b(v: object, what: str) -> bool:
    if not isinstance(v, bool):
        raise CodecError(f"{what} must be a boolean, got {type(v).__name__}")
    return v


def _map(v: object, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise CodecError(f"{what} must be a map, got {type(v).__name__}")
    return v


def _seq(v: object, what: str, n: int) -> list[Any]:
    if not isinstance(v, list) or len(v) != n:
        raise CodecError(f"{what} must be a list of {n} items, got {v!r:.80}")
    return v


def _field(d: Mapping[str, Any], key: str) -> Any:
    if key not in d:
        raise CodecError(f"control message has no field {key!r}")
    return d[key]


def _str(d: Mapping[str, Any], key: str) -> str:
    return _s(_field(d, key), key)


def _int(d: Mapping[str, Any], key: str) -> int:
    return _i(_field(d, key), key)


def _float(d: Mapping[str, Any], key: str) -> float:
    return _f(_field(d, key), key)


def _list(d: Mapping[str, Any], key: str) -> list[Any]:
    v = _field(d, key)
    if not isinstance(v, list):
        raise CodecError(f"{key} must be a list, got {type(v).__name__}")
    return v


def _opt(d: Mapping[str, Any], key: str, check: Callable[[object, str], T]) -> T | None:
    v = d.get(key)
    return None if v is None else check(v, key)


def _stage_stats(d: Mapping[str, Any]) -> StageStats:
    st = StageStats(
        stage=_str(d, "stage"),
        requests=_int(d, "requests"),
        batches=_int(d, "batches"),
        errors=_int(d, "errors"),
        in_flight=_int(d, "in_flight"),
        service_s_per_request=_float(d, "service_s_per_request"),
        service_s_per_batch=_float(d, "service_s_per_batch"),
        mean_batch=_float(d, "mean_batch"),
        max_batch=_int(d, "max_batch"),
    )
    if st.service_s_per_request < 0 or st.service_s_per_batch < 0:
        raise CodecError(f"stage {st.stage!r}: negative service time")
    return st
