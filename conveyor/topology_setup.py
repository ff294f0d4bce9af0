"""Declare every exchange, queue and binding of a plan (idempotent; workers and clients call it).

What gets declared for a plan with topology ``T`` (names from ``conveyor.topology``):

* ``T.dead_letter_exchange`` (fanout) and ``T.dead_letter_queue`` bound to it, bounded by
  the plan's ``scheduling.dead_letter_ttl_s`` and ``dead_letter_max`` (oldest dropped).
* ``T.input_exchange``: ``x-random`` for random partitioning, ``direct`` for hash / range;
  one queue ``T.input_queue(i)`` per shard, bound with ``initial_bindings``.
* For every stage but ``plan.stages[0]`` (which reads the input shards): ``T.stage_exchange``.
  A plain stage gets a ``direct`` exchange and one queue ``T.stage_queue(s)`` (competing
  consumers) bound with the stage name as routing key. A join stage gets an
  ``x-consistent-hash`` exchange (routing key = request id) and ``join_shards(plan, s)``
  queues ``T.stage_queue(s, i)`` bound with weight ``"1"``.
* ``T.control_exchange`` (topic) for heartbeats and controller commands.
* For every input shard and stage queue ``q``, its suspect queue ``T.suspect_queue(q)``
  (same type, unbounded, bound to nothing: workers publish to it through the default
  exchange; ``workers.redelivery``).

Every input and stage queue dead-letters to ``T.dead_letter_exchange``. They are quorum
queues (durable, replicated, with the plan's delivery limit) when the plan's
``queues.type`` or the caller's ``queue_type`` says ``"quorum"``; then every exchange and
queue here is durable. Re-declaring with the same arguments is a no-op on both
transports, so every process may call this at start.

The plan's ``limits`` (``conveyor.plan.PlanLimits``) shape the queues (``work_queue``):
the broker's delivery limit on quorum queues is a backstop to the worker's own count,
input shards are bounded in requests (``input_queue_length`` messages) and stage queues in
batches, both ``reject-publish`` so a full queue refuses the publisher at once.
"""

from __future__ import annotations

from conveyor.errors import TransportClosed, TransportError
from conveyor.plan import Plan, QueueType, StageSpec
from conveyor.topology import Topology, initial_bindings
from conveyor.transport import ExchangeSpec, ExchangeType, QueueSpec, Transport


def join_shards(plan: Plan, stage: StageSpec) -> int:
    """Shard queues of a join stage: one per scheduled worker (each join worker owns one)."""
    return max(1, plan.scheduling.for_stage(stage.name).workers)


def consumes_stage_queue(plan: Plan, stage: StageSpec) -> bool:
    """True for every stage that reads its own stage queue(s) (all but the first)."""
    return stage.name != plan.stages[0].name


def stage_queues(plan: Plan, stage: StageSpec) -> list[str]:
    """The queues a worker hosting ``stage`` may consume (all shards of it)."""
    topo = Topology.of(plan)
    if not consumes_stage_queue(plan, stage):
        return [topo.input_queue(i) for i in range(plan.partitioning.shards)]
    if stage.is_join:
        return [topo.stage_queue(stage.name, i) for i in range(join_shards(plan, stage))]
    return [topo.stage_queue(stage.name)]


async def _queue_exists(transport: Transport, queue: str) -> bool:
    try:
        await transport.queue_stats(queue)
    except TransportClosed:
        raise
    except TransportError:
        return False
    return True


def work_queue(
    plan: Plan,
    name: str,
    *,
    durable: bool,
    max_length: int | None,
    queue_type: QueueType | None = None,
) -> QueueSpec:
    """The spec of an input shard or stage queue of ``plan`` (see the module doc);
    ``queue_type`` overrides the plan's ``queues.type``."""
    quorum = (queue_type or plan.queues.type) == "quorum"
    limit = plan.queues.delivery_limit or plan.limits.delivery_limit
    return QueueSpec(
        name,
        durable=durable or quorum,
        dead_letter_exchange=Topology.of(plan).dead_letter_exchange,
        max_length=max_length,
        overflow="reject-publish",
        quorum=quorum,
        # The worker refuses delivery ``limit + 1`` with a reply; the broker's limit only
        # catches a worker dying on that refusal too.
        delivery_limit=limit if quorum else None,
    )


def dead_letter_queue(plan: Plan, *, durable: bool) -> QueueSpec:
    """Bounded: the oldest dead letters go first (drop-head), none stays for ever."""
    sched = plan.scheduling
    return QueueSpec(
        Topology.of(plan).dead_letter_queue,
        durable=durable,
        max_length=sched.dead_letter_max,
        overflow="drop-head",
        message_ttl_ms=int(sched.dead_letter_ttl_s * 1000),
    )


async def declare_plan_topology(
    transport: Transport,
    plan: Plan,
    *,
    durable: bool = True,
    queue_type: QueueType | None = None,
) -> None:
    """Declare the plan's exchanges, queues and bindings on ``transport`` (idempotent).

    Durable exchanges and queues by default, so that the topology and the persistent
    messages in it survive a broker restart; ``durable=False`` for throw-away deployments.
    Every process of one deployment must pass the same value: RabbitMQ refuses a
    re-declaration with other flags (the embedded broker ignores it).
    ``queue_type`` overrides the plan's ``queues.type`` (None: the plan's, classic when the
    plan chose none); quorum implies durable.
    """
    topo = Topology.of(plan)
    durable = durable or (queue_type or plan.queues.type) == "quorum"
    dlx = topo.dead_letter_exchange
    await transport.declare_exchange(ExchangeSpec(dlx, ExchangeType.FANOUT, durable=durable))
    await transport.declare_queue(dead_letter_queue(plan, durable=durable))
    await transport.bind_queue(topo.dead_letter_queue, dlx, "")
    await transport.declare_exchange(
        ExchangeSpec(topo.control_exchange, ExchangeType.TOPIC, durable=durable)
    )

    part = plan.partitioning
    kind = ExchangeType.RANDOM if part.kind == "random" else ExchangeType.DIRECT
    await transport.declare_exchange(ExchangeSpec(topo.input_exchange, kind, durable=durable))
    for shard, keys in initial_bindings(part).items():
        queue = topo.input_queue(shard)
        # hash/range keys are bound only by whoever creates the shard queue: afterwards the
        # controller owns them (it may have moved a key; re-binding it here would send that
        # key to two shards). docs/scheduling.md, "Who owns the bindings".
        fresh = part.kind == "random" or not await _queue_exists(transport, queue)
        await transport.declare_queue(
            work_queue(plan, queue, durable=durable, queue_type=queue_type,
                       max_length=plan.limits.input_queue_length)
        )
        if fresh:
            for key in keys:
                await transport.bind_queue(queue, topo.input_exchange, key)
        await transport.declare_queue(suspect_queue_spec(plan, queue, durable, queue_type))

    for stage in plan.stages:
        if consumes_stage_queue(plan, stage):
            await _declare_stage(transport, plan, stage, durable, queue_type)


async def _declare_stage(
    transport: Transport, plan: Plan, stage: StageSpec, durable: bool,
    queue_type: QueueType | None,
) -> None:
    """A stage's exchange and queue(s): one competing queue, or a join's shard queues."""
    topo = Topology.of(plan)
    exchange = topo.stage_exchange(stage.name)
    kind = ExchangeType.HASH if stage.is_join else ExchangeType.DIRECT
    await transport.declare_exchange(ExchangeSpec(exchange, kind, durable=durable))
    if stage.is_join:
        routes = [(topo.stage_queue(stage.name, i), "1") for i in range(join_shards(plan, stage))]
    else:
        routes = [(topo.stage_queue(stage.name), stage.name)]
    for queue, key in routes:
        await transport.declare_queue(
            work_queue(plan, queue, durable=durable, queue_type=queue_type,
                       max_length=plan.limits.max_queued_batches)
        )
        await transport.bind_queue(queue, exchange, key)
        await transport.declare_queue(suspect_queue_spec(plan, queue, durable, queue_type))


def suspect_queue_spec(
    plan: Plan, queue: str, durable: bool, queue_type: QueueType | None = None
) -> QueueSpec:
    """The suspect queue of work queue ``queue``: its type, dead-lettering and delivery
    limit, no length bound (what it holds came out of ``queue`` and was let in once)."""
    name = Topology.of(plan).suspect_queue(queue)
    return work_queue(plan, name, durable=durable, max_length=None, queue_type=queue_type)


async def delete_plan_topology(transport: Transport, plan: Plan) -> None:
    """Delete every queue and exchange ``declare_plan_topology`` made (messages are lost)."""
    topo = Topology.of(plan)
    work = [topo.input_queue(i) for i in range(plan.partitioning.shards)]
    exchanges = [topo.dead_letter_exchange, topo.control_exchange, topo.input_exchange]
    for stage in plan.stages:
        if consumes_stage_queue(plan, stage):
            work += stage_queues(plan, stage)
            exchanges.append(topo.stage_exchange(stage.name))
    for queue in [topo.dead_letter_queue, *work, *map(topo.suspect_queue, work)]:
        await transport.delete_queue(queue)
    for exchange in exchanges:
        await transport.delete_exchange(exchange)
