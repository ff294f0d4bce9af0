"""The plan: the manifest every part of Conveyor shares (docs/plan.md is the spec).

A plan is a directory holding ``plan.json`` and one ``.onnx`` file per stage. The
converter writes it (``Plan.save``), workers, the controller and the client read it
(``Plan.load``). Its ``hash`` covers the JSON (less the hash itself) and the bytes of
every stage file and every external data file they name, so two workers agree on a plan
exactly when their hashes match. Every file a plan names must lie inside its directory
(``conveyor.plan_files``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from conveyor.errors import PlanError
from conveyor.plan_files import confined, stage_files

PLAN_FORMAT = "conveyor.plan/1"
PLAN_FILE = "plan.json"
#: ``StageInput.source`` of a tensor that is a graph input of the whole model.
MODEL_INPUT = "@input"
#: Name of the symbolic batch dimension in every shape.
BATCH = "batch"

Dim = int | str
PartitionKind = Literal["random", "hash", "range"]
QueueType = Literal["classic", "quorum"]
SplitKind = Literal["layer", "function", "none"]
ALLOWED_DTYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"}
)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: numpy dtype name and shape (str entries are symbolic, ``batch`` first)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def sample_bytes(self) -> int:
        """Bytes of one sample (the batch dimension dropped); symbolic dims count as 1."""
        import numpy as np

        n = 1
        for d in self.shape[1:]:
            n *= d if isinstance(d, int) else 1
        return n * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class StageInput:
    tensor: TensorSpec
    #: Name of the stage producing it, or ``MODEL_INPUT`` for a graph input of the model.
    source: str


@dataclass(frozen=True)
class StageOutput:
    tensor: TensorSpec
    #: Stages that read this tensor (fan-out when several).
    consumers: tuple[str, ...] = ()
    #: True when this tensor is an output of the whole model (sent to the caller).
    model_output: bool = False


@dataclass(frozen=True)
class StageCost:
    nodes: int = 0
    #: Estimated floating-point operations for one sample.
    flops: float = 0.0
    #: Bytes of the initializers (weights) the stage holds.
    param_bytes: int = 0
    #: Bytes per sample the stage receives across its input cut.
    in_bytes_per_sample: int = 0
    #: The cost the splitter balanced (compute plus transfer, arbitrary but consistent units).
    cost: float = 0.0
    #: This stage's share of the total cost, 0..1.
    share: float = 0.0
    #: The converter's account: the share under the FLOP estimate and (``--profile``)
    #: under the measured times. None (left out of plan.json, so older plans keep their
    #: hash): not recorded.
    estimated_share: float | None = None
    measured_share: float | None = None


@dataclass(frozen=True)
class StageSpec:
    name: str
    file: str
    inputs: tuple[StageInput, ...]
    outputs: tuple[StageOutput, ...]
    cost: StageCost = field(default_factory=StageCost)
    #: The function key a function split grouped this stage by (None for a layer split).
    group: str | None = None

    @property
    def upstream(self) -> tuple[str, ...]:
        """Stages this one reads from, in input order, without repeats (no MODEL_INPUT)."""
        seen: dict[str, None] = {}
        for i in self.inputs:
            if i.source != MODEL_INPUT:
                seen.setdefault(i.source, None)
        return tuple(seen)

    @property
    def is_join(self) -> bool:
        """True when inputs come from more than one place (a fan-in needing a join)."""
        return len({i.source for i in self.inputs}) > 1


@dataclass(frozen=True)
class Partitioning:
    """How requests are spread over the shards (stage-0 queues) of the input exchange."""

    kind: PartitionKind = "random"
    shards: int = 1
    #: range: what is compared with the boundaries: ``"key"`` (the request's numeric key) or
    #: ``"dim:TENSOR:AXIS"`` (a tensor's dimension, e.g. sequence length).
    range_on: str = "key"
    #: range: ascending upper bounds, one per shard but the last (shard i takes values
    #: ``boundaries[i-1] <= v < boundaries[i]``).
    boundaries: tuple[float, ...] = ()


@dataclass(frozen=True)
class StageSchedule:
    workers: int = 1
    prefetch: int = 32
    max_batch: int = 16
    max_delay_ms: float = 2.0
    #: Bounds the hybrid policy keeps dynamic prefetch changes within.
    prefetch_min: int = 1
    prefetch_max: int = 64


#: Defaults of the dead-letter queue's bounds (``Scheduling``): a week, 100,000 messages.
DEAD_LETTER_TTL_S = 7 * 24 * 3600.0
DEAD_LETTER_MAX = 100_000


@dataclass(frozen=True)
class Scheduling:
    default: StageSchedule = field(default_factory=StageSchedule)
    stages: Mapping[str, StageSchedule] = field(default_factory=dict)
    #: hybrid: at most this many flexible workers moved between stages at once.
    max_moves: int = 1
    #: The dead-letter queue keeps a message this long (seconds) and at most this many
    #: (the oldest go first): it cannot fill the broker's disk. Written to plan.json only
    #: when changed, so plans saved before these settings keep their hash.
    dead_letter_ttl_s: float = DEAD_LETTER_TTL_S
    dead_letter_max: int = DEAD_LETTER_MAX

    def for_stage(self, name: str) -> StageSchedule:
        return self.stages.get(name, self.default)


@dataclass(frozen=True)
class PlanLimits:
    """What a deployment of the plan refuses or bounds (docs/operations.md, "Limits").

    ``None`` is "no bound". Plans written before these settings existed get the defaults:
    three deliveries (counted by the worker), no request or queue bound. The queue type is
    ``Plan.queues``; the dead-letter bounds are ``Scheduling.dead_letter_*``.
    """

    #: A request (or stage message) delivered this many times whose worker died each time
    #: is dead-lettered with a ``CrashLoopError`` reply instead of being run again.
    delivery_limit: int = 3
    #: Rows (batch dimension) one request may carry; checked by the client and at admission.
    max_request_rows: int | None = None
    #: Bytes of tensor data one request may carry; checked by the client and at admission.
    max_request_bytes: int | None = None
    #: Requests one input shard queue holds at most: its ``x-max-length`` is this over
    #: ``pack_requests`` messages (a pack counts as its requests), ``reject-publish``.
    max_queued_requests: int | None = None
    #: Requests per request pack (the SDK packs at most this many; with
    #: ``max_queued_requests`` set, the ingress refuses larger packs).
    pack_requests: int = 64
    #: Messages (batches) one stage queue holds at most (``reject-publish``: the upstream
    #: worker backs off until there is room).
    max_queued_batches: int | None = None

    @property
    def input_queue_length(self) -> int | None:
        """The input shard queues' ``x-max-length`` in messages (None: unbounded)."""
        if self.max_queued_requests is None:
            return None
        return max(1, self.max_queued_requests // self.pack_requests)

    def check(self) -> None:
        if self.delivery_limit < 1:
            raise PlanError(f"limits.delivery_limit must be at least 1, got {self.delivery_limit}")
        if self.pack_requests < 1:
            raise PlanError(f"limits.pack_requests must be at least 1, got {self.pack_requests}")
        for name in ("max_request_rows", "max_request_bytes", "max_queued_requests",
                     "max_queued_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise PlanError(f"limits.{name} must be a positive integer or null, got {value!r}")


@dataclass(frozen=True)
class SplitInfo:
    by: SplitKind = "none"
    k: int = 1
    #: slowest stage cost over the ideal (total / k); 1.0 is perfect balance.
    balance: float = 1.0
    cost_model: Literal["flops", "profile"] = "flops"
    #: The converter's account (left out of plan.json when unset, so older plans keep
    #: their hash): the sizes symbolic dimensions were costed at, whether the model was
    #: probed, the balance under the FLOP estimate and under ``--profile``, what it merged
    #: or fixed.
    dims: Mapping[str, int] = field(default_factory=dict)
    probed: bool | None = None
    estimated_balance: float | None = None
    measured_balance: float | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueueSettings:
    """What kind of RabbitMQ queues carry the plan's requests (input and stage queues)."""

    #: ``"quorum"``: replicated over the cluster, survives the loss of a minority of nodes,
    #: dead-letters after ``delivery_limit`` returns. ``"classic"``: one node's queue.
    #: None (not chosen): classic for a local run, quorum in the stacks that
    #: ``conveyor deploy`` generates (docs/deploy.md).
    type: QueueType | None = None
    #: quorum queues: dead-letter a message returned more than this many times (a request
    #: that crashes its worker); None: RabbitMQ's default (no limit before 4.0).
    delivery_limit: int | None = None
    #: Messages written to disk (AMQP delivery mode 2) so that what the broker confirmed
    #: survives its restart; False trades that for speed. None (not chosen): persistent.
    #: The URL's ``?persistent=``, ``CONVEYOR_AMQP_PERSISTENT`` and ``--[no-]persistent``
    #: win over it (docs/operations.md, "Broker restarts").
    persistent: bool | None = None


@dataclass(frozen=True)
class Plan:
    name: str
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stages: tuple[StageSpec, ...]
    split: SplitInfo = field(default_factory=SplitInfo)
    partitioning: Partitioning = field(default_factory=Partitioning)
    scheduling: Scheduling = field(default_factory=Scheduling)
    queues: QueueSettings = field(default_factory=QueueSettings)
    hash: str = ""
    limits: PlanLimits = field(default_factory=PlanLimits)
    #: Where the plan was loaded from or saved to; not part of the JSON.
    directory: Path | None = field(default=None, compare=False)

    # -- access ---------------------------------------------------------------------------
    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise PlanError(f"plan {self.name!r} has no stage {name!r}; it has {self.stage_names}")

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage_path(self, name: str) -> Path:
        if self.directory is None:
            raise PlanError(f"plan {self.name!r} has no directory; load or save it first")
        return confined(self.directory, self.stage(name).file, "stage file")

    @property
    def entry_stages(self) -> tuple[StageSpec, ...]:
        """Stages that read a model input (the ones requests are published to)."""
        return tuple(s for s in self.stages if any(i.source == MODEL_INPUT for i in s.inputs))

    @property
    def short_hash(self) -> str:
        return self.hash[:16]

    def with_settings(
        self,
        *,
        partitioning: Partitioning | None = None,
        scheduling: Scheduling | None = None,
        queues: QueueSettings | None = None,
        limits: PlanLimits | None = None,
    ) -> Plan:
        """A copy with other settings (rehash with ``save``)."""
        return replace(
            self,
            partitioning=partitioning or self.partitioning,
            scheduling=scheduling or self.scheduling,
            queues=queues or self.queues,
            limits=limits or self.limits,
        )

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("directory")
        d["scheduling"]["stages"] = {k: asdict(v) for k, v in self.scheduling.stages.items()}
        if self.queues == QueueSettings():
            # absent when not chosen: plans written before the setting keep their hash
            d.pop("queues")
        elif self.queues.persistent is None:
            del d["queues"]["persistent"]  # newer than the others: absent unless chosen
        for key, default in (
            ("dead_letter_ttl_s", DEAD_LETTER_TTL_S), ("dead_letter_max", DEAD_LETTER_MAX)
        ):
            if d["scheduling"][key] == default:
                del d["scheduling"][key]
        # Left out at its defaults, so plans written before it keep their hash.
        if self.limits == PlanLimits():
            d.pop("limits")
        _drop_unset(d["split"])
        for stage in d["stages"]:
            _drop_unset(stage["cost"])
        return {"format": PLAN_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], directory: Path | None = None) -> Plan:
        try:
            if d.get("format") != PLAN_FORMAT:
                raise PlanError(f"unknown plan format {d.get('format')!r}; expected {PLAN_FORMAT}")
            sched = d.get("scheduling", {})
            return cls(
                name=str(d["name"]),
                opset=int(d["opset"]),
                inputs=tuple(_tensor(t) for t in d["inputs"]),
                outputs=tuple(_tensor(t) for t in d["outputs"]),
                stages=tuple(_stage(s) for s in d["stages"]),
                split=_split(d.get("split", {})),
                partitioning=_partitioning(d.get("partitioning", {})),
                scheduling=Scheduling(
                    default=StageSchedule(**sched.get("default", {})),
                    stages={k: StageSchedule(**v) for k, v in sched.get("stages", {}).items()},
                    max_moves=int(sched.get("max_moves", 1)),
                    dead_letter_ttl_s=float(sched.get("dead_letter_ttl_s", DEAD_LETTER_TTL_S)),
                    dead_letter_max=int(sched.get("dead_letter_max", DEAD_LETTER_MAX)),
                ),
                queues=_queues(d.get("queues", {})),
                hash=str(d.get("hash", "")),
                limits=PlanLimits(**d.get("limits", {})),
                directory=directory,
            )
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"invalid plan.json: {type(exc).__name__}: {exc}") from exc

    # -- files ----------------------------------------------------------------------------
    def compute_hash(self, directory: Path) -> str:
        body = self.to_dict()
        body.pop("hash", None)
        h = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
        for s in self.stages:
            # the model and every external data file it names, all inside the directory
            for part in stage_files(directory, s.file):
                try:
                    with part.open("rb") as f:
                        while chunk := f.read(1 << 20):
                            h.update(chunk)
                except OSError as exc:
                    raise PlanError(f"stage {s.name!r}: cannot read {part}: {exc}") from exc
        return h.hexdigest()

    def save(self, directory: str | os.PathLike[str]) -> Plan:
        """Write ``plan.json`` into ``directory`` (stage files must be there already)."""
        path = Path(directory)
        plan = replace(self, hash=self.compute_hash(path), directory=path)
        tmp = path / (PLAN_FILE + ".tmp")
        tmp.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        tmp.replace(path / PLAN_FILE)
        return plan

    @classmethod
    def load(cls, directory: str | os.PathLike[str], *, verify: bool = True) -> Plan:
        path = Path(directory)
        manifest = path / PLAN_FILE
        try:
            d = json.loads(manifest.read_text())
        except FileNotFoundError as exc:
            raise PlanError(f"{path} is not a plan directory: no {PLAN_FILE}") from exc
        except (OSError, ValueError) as exc:
            raise PlanError(f"cannot read {manifest}: {exc}") from exc
        plan = cls.from_dict(d, directory=path)
        plan.validate()
        if verify:
            actual = plan.compute_hash(path)
            if actual != plan.hash:
                raise PlanError(
                    f"plan {path} is corrupt: hash in plan.json is {plan.hash[:16]}, "
                    f"files hash to {actual[:16]}"
                )
        return plan

    def validate(self) -> None:
        """Check the DAG: unique names, known sources and consumers, allowed dtypes, and one
        stage producing the model outputs."""
        names = self.stage_names
        if not names:
            raise PlanError(f"plan {self.name!r} has no stages")
        if len(set(names)) != len(names):
            raise PlanError(f"plan {self.name!r} has duplicate stage names: {names}")
        known = set(names)
        for s in self.stages:
            for i in s.inputs:
                if i.source != MODEL_INPUT and i.source not in known:
                    raise PlanError(f"stage {s.name!r} reads from unknown stage {i.source!r}")
            for o in s.outputs:
                for c in o.consumers:
                    if c not in known:
                        raise PlanError(f"stage {s.name!r} feeds unknown stage {c!r}")
            for t in _tensors_of(s):
                if t.dtype not in ALLOWED_DTYPES:
                    raise PlanError(f"stage {s.name!r}: tensor {t.name!r} has dtype {t.dtype!r}")
        # workers reply from one place: one stage (a chain's last, or a gather/join) makes
        # every model output
        sinks = [s.name for s in self.stages if any(o.model_output for o in s.outputs)]
        if len(sinks) > 1:
            raise PlanError(
                f"plan {self.name!r}: model outputs come from {len(sinks)} stages {sinks}; "
                "one stage must produce all of them (the converter's function split adds a "
                "gather stage for this)"
            )
        if not sinks:
            raise PlanError(f"plan {self.name!r}: no stage produces a model output")
        self.limits.check()
        p = self.partitioning
        if p.shards < 1:
            raise PlanError(f"partitioning needs at least one shard, got {p.shards}")
        if p.kind == "range" and len(p.boundaries) != p.shards - 1:
            raise PlanError(
                f"range partitioning over {p.shards} shards needs {p.shards - 1} boundaries, "
                f"got {len(p.boundaries)}"
            )


#: Fields of SplitInfo / StageCost written only when set (the converter's account).
_UNSET_OMITTED = ("dims", "probed", "estimated_balance", "measured_balance", "notes",
                  "estimated_share", "measured_share")


def _drop_unset(d: dict[str, Any]) -> None:
    for key in _UNSET_OMITTED:
        if key in d and d[key] in (None, {}, (), []):
            del d[key]


def _split(d: Mapping[str, Any]) -> SplitInfo:
    return SplitInfo(**{**d, "dims": dict(d.get("dims", {})),
                        "notes": tuple(d.get("notes", ()))})


def _tensors_of(s: StageSpec) -> Iterable[TensorSpec]:
    yield from (i.tensor for i in s.inputs)
    yield from (o.tensor for o in s.outputs)


def _tensor(d: Mapping[str, Any]) -> TensorSpec:
    return TensorSpec(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))


def _stage(d: Mapping[str, Any]) -> StageSpec:
    return StageSpec(
        name=str(d["name"]),
        file=str(d["file"]),
        inputs=tuple(StageInput(_tensor(i["tensor"]), str(i["source"])) for i in d["inputs"]),
        outputs=tuple(
            StageOutput(_tensor(o["tensor"]), tuple(o.get("consumers", ())),
                        bool(o.get("model_output", False)))
            for o in d["outputs"]
        ),
        cost=StageCost(**d.get("cost", {})),
        group=d.get("group"),
    )


def _partitioning(d: Mapping[str, Any]) -> Partitioning:
    return Partitioning(
        kind=d.get("kind", "random"),
        shards=int(d.get("shards", 1)),
        range_on=str(d.get("range_on", "key")),
        boundaries=tuple(float(b) for b in d.get("boundaries", ())),
    )


def _queues(d: Mapping[str, Any]) -> QueueSettings:
    kind = d.get("type")
    if kind not in (None, "classic", "quorum"):
        raise PlanError(f"queues.type must be 'classic' or 'quorum', got {kind!r}")
    limit = d.get("delivery_limit")
    if limit is not None and (isinstance(limit, bool) or int(limit) < 0):
        raise PlanError(f"queues.delivery_limit must be a count >= 0, got {limit!r}")
    persistent = d.get("persistent")
    if persistent is not None and not isinstance(persistent, bool):
        raise PlanError(f"queues.persistent must be true, false or null, got {persistent!r}")
    return QueueSettings(
        type=kind, delivery_limit=None if limit is None else int(limit), persistent=persistent
    )
