"""Names and routing of a plan's exchanges and queues (docs/wire.md shows them in use).

Every name starts with ``conveyor.<plan short hash>`` so that two plans, or two versions
of one plan, never share a queue. For a plan with short hash ``H``:

=====================================  ==============  ====================================
name                                   type            what
=====================================  ==============  ====================================
``conveyor.H.input``                   see below       requests from clients
``conveyor.H.input.<shard>``           queue           requests of one input shard
``conveyor.H.stage.<stage>``           direct / hash   tensors for a stage (non-entry)
``conveyor.H.stage.<stage>``           queue           its queue (competing consumers)
``conveyor.H.stage.<stage>.<shard>``   queue           a join stage's shard queues
``conveyor.H.suspect.<queue>``         queue           copies of ``conveyor.H.<queue>``'s
                                                       messages whose worker died (one at a
                                                       time: ``workers.redelivery``)
``conveyor.H.control``                 topic           heartbeats and controller commands
``conveyor.H.dlx`` / ``conveyor.H.dead``  fanout / queue  rejected and expired messages
``conveyor.H.reply.<id>``              queue           a client's replies (the client owns it)
=====================================  ==============  ====================================

Workers reply only to queues named ``conveyor.H.reply.<id>`` (``is_reply_queue``; ``<id>``
of letters, digits, ``_`` and ``-``): a request naming any other ``reply_to`` is refused, so
a client cannot make workers write into queues that are not replies of this plan.

Input partitioning (``Plan.partitioning``), computed by the publisher so that any AMQP
client can do it (``partition_routing_key``):

* random: the input exchange is ``x-random``; routing key ignored (use ``""``).
* hash: the input exchange is ``direct``; the routing key is ``p.<n>`` with
  ``n = crc32(key as UTF-8) % PARTITIONS``. Each of the ``PARTITIONS`` virtual
  partitions is bound to one shard queue (initially ``n % shards``); the controller moves
  partitions between shards by rebinding, so the same key reaches one shard at any moment.
* range: the input exchange is ``direct``; the routing key is ``r.<i>`` where ``i`` is
  the index of the first boundary greater than the value (``bisect_right``), bound to
  shard ``i`` initially.

Join stages (several upstream stages) use an ``x-consistent-hash`` exchange keyed on the
request id, so all parts of one request reach the same shard queue.
"""

from __future__ import annotations

import re
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from conveyor.errors import ConfigError
from conveyor.plan import Partitioning, Plan

#: Number of virtual hash partitions (routing keys ``p.0`` .. ``p.63``).
PARTITIONS = 64
PREFIX = "conveyor"
_REPLY_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def hash_partition(key: str, partitions: int = PARTITIONS) -> int:
    return zlib.crc32(key.encode("utf-8")) % partitions


def range_bucket(value: float, boundaries: Sequence[float]) -> int:
    return bisect_right(list(boundaries), value)


def partition_routing_key(partitioning: Partitioning, key: str | None) -> str:
    """The input exchange routing key for a request with partition key ``key``."""
    if partitioning.kind == "random":
        return ""
    if key is None:
        raise ConfigError(f"{partitioning.kind} partitioning needs a request key; none given")
    if partitioning.kind == "hash":
        return f"p.{hash_partition(key)}"
    try:
        value = float(key)
    except ValueError as exc:
        raise ConfigError(f"range partitioning needs a numeric key, got {key!r}") from exc
    return f"r.{range_bucket(value, partitioning.boundaries)}"


def initial_bindings(partitioning: Partitioning) -> dict[int, list[str]]:
    """Shard index -> routing keys bound to its queue at declaration time."""
    shards = partitioning.shards
    if partitioning.kind == "random":
        return {s: [""] for s in range(shards)}
    if partitioning.kind == "hash":
        out: dict[int, list[str]] = {s: [] for s in range(shards)}
        for p in range(PARTITIONS):
            out[p % shards].append(f"p.{p}")
        return out
    return {s: [f"r.{s}"] for s in range(shards)}


@dataclass(frozen=True)
class Topology:
    plan_id: str

    @classmethod
    def of(cls, plan: Plan) -> Topology:
        if not plan.hash:
            raise ConfigError(f"plan {plan.name!r} has no hash; load it with Plan.load")
        return cls(plan.short_hash)

    @property
    def base(self) -> str:
        return f"{PREFIX}.{self.plan_id}"

    @property
    def input_exchange(self) -> str:
        return f"{self.base}.input"

    def input_queue(self, shard: int) -> str:
        return f"{self.base}.input.{shard}"

    def stage_exchange(self, stage: str) -> str:
        return f"{self.base}.stage.{stage}"

    def stage_queue(self, stage: str, shard: int | None = None) -> str:
        q = f"{self.base}.stage.{stage}"
        return q if shard is None else f"{q}.{shard}"

    def suspect_queue(self, queue: str) -> str:
        """The queue of suspects of input shard or stage queue ``queue`` (messages whose
        worker died, run one at a time): ``conveyor.H.suspect.input.0`` for
        ``conveyor.H.input.0``. Workers publish to it through the default exchange."""
        prefix = f"{self.base}."
        if not queue.startswith(prefix):
            raise ConfigError(f"queue {queue!r} is not one of plan {self.plan_id}'s")
        return f"{self.base}.suspect.{queue[len(prefix):]}"

    def reply_queue(self, client_id: str) -> str:
        """The reply queue of one client (``client_id``: letters, digits, ``_``, ``-``)."""
        return f"{self.base}.reply.{client_id}"

    def is_reply_queue(self, name: str) -> bool:
        """True for a name of the plan's reply-queue scheme (``reply_queue``)."""
        prefix = f"{self.base}.reply."
        return name.startswith(prefix) and _REPLY_ID.fullmatch(name, len(prefix)) is not None

    @property
    def control_exchange(self) -> str:
        return f"{self.base}.control"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.base}.dlx"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.base}.dead"

    # control-exchange routing keys
    @staticmethod
    def heartbeat_key(worker_id: str) -> str:
        return f"heartbeat.{worker_id}"

    @staticmethod
    def command_key(worker_id: str) -> str:
        return f"command.{worker_id}"
