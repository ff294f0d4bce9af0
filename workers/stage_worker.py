"""The stage worker: hosts stages of a plan on a transport and keeps the delivery promises.

``StageWorker(plan, transport, stages, settings)`` (or ``workers.serve``) hosts the named
stages (all by default) in this process. ``await worker.start()`` declares the plan's
topology, loads one onnxruntime session per stage and starts consuming:

* the input shard queues when it hosts ``plan.stages[0]`` (all shards, or ``settings.shard``):
  the *ingress* decodes each request (or request pack), checks it against the plan (plan
  hash, deadline, tensors) and micro-batches it;
* the stage queue(s) of every other hosted stage (a join stage: its shard queues).

Decoding and admission live in ``workers.intake``; sending in ``workers.outbox``; the
batch loops in ``workers.runner``.

A batch flows through the stages hosted here in memory (``StageRunner.accept_local``);
it goes through the broker only to a stage hosted elsewhere, or one whose inputs are not
all produced here. Model outputs go back to each request's ``reply_to``.

Delivery: a delivery is acked only once the outputs of all its requests are published
and confirmed (``workers.settlement``); a request that fails decoding, validation or
inference is rejected to the dead-letter exchange and answered with an error reply; an
expired one is answered with ``DeadlineExceeded`` and acked, not run.

Control (``conveyor.control.Controllable``, driven by ``workers.control.agent``):
``snapshot()``, ``set_prefetch(queue, n)``, ``start_consuming(stage, queue=None)``,
``stop_consuming(stage, queue=None)``; ``stats()`` is the fuller local view.

Shutdown: ``stop(grace)`` stops taking new deliveries, lets work in flight finish for up
to ``grace`` seconds, cancels the rest (those messages are redelivered) and cancels its
consumers. The transport belongs to the caller and stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from enum import Enum
from functools import partial
from types import TracebackType
from typing import Any

from conveyor.control import QueueConsumption
from conveyor.eager import mark_eager
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    TransportError,
)
from conveyor.plan import MODEL_INPUT, Plan
from conveyor.topology import Topology
from conveyor.topology_setup import declare_plan_topology
from conveyor.transport import Consumer, Delivery, Reconnecting, Transport
from workers.consumer_records import ConsumerRecord, ConsumerRecords
from workers.dead_letters import DeadLetters
from workers.intake import Intake
from workers.metrics import OutboxView, QueueView, RunnerView, WorkerMetrics
from workers.outbox import Outbox
from workers.redelivery import RedeliveryGuard
from workers.routes import Routes, build_routes, check_model_outputs
from workers.runner import Batch, Request, StageRunner
from workers.runner_setup import build_runners, link_runners
from workers.session import Tensor
from workers.settings import WorkerSettings
from workers.settlement import Lot, Outcome
from workers.stats import ConsumerStats, ControlStats, WorkerStats, control_snapshot

log = logging.getLogger(__name__)

#: Extra seconds a shutdown gives publish-then-ack steps already under way after the grace.
SETTLE_GRACE = 2.0


class WorkerState(Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class StageWorker:
    """Hosts ``stages`` of ``plan`` on ``transport`` (see the module doc)."""

    def __init__(
        self,
        plan: Plan,
        transport: Transport,
        stages: Sequence[str] | None = None,
        settings: WorkerSettings | None = None,
        *,
        worker_id: str | None = None,
        declare: bool = True,
        home: Sequence[str] | None = None,
    ) -> None:
        names = list(stages) if stages else plan.stage_names
        for name in names:
            plan.stage(name)  # PlanError naming the stages it has
        if len(set(names)) != len(names):
            raise ConfigError(f"stage listed twice: {names}")
        self.plan = plan
        self.transport = transport
        self.settings = settings or WorkerSettings()
        self.topology = Topology.of(plan)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.hosted: tuple[str, ...] = tuple(n for n in plan.stage_names if n in names)
        #: Stages whose queues are consumed from the start; the others are loaded and
        #: wait for ``start_consuming`` (a flexible worker the controller may move).
        self.home: tuple[str, ...] = self.hosted if home is None else tuple(home)
        for name in self.home:
            if name not in self.hosted:
                raise ConfigError(f"home stage {name!r} is not among the hosted {self.hosted}")
        self._declare = declare
        self._state = WorkerState.NEW
        self._runners: dict[str, StageRunner] = {}
        self._routes = Routes({}, {})
        self._records = ConsumerRecords(
            plan, self.topology, self.settings, self.hosted, self.worker_id
        )
        self.outbox = Outbox(transport, self.topology, plan.hash)
        self._intake = Intake(plan, self._runners, self.outbox)
        #: Publishes refused deliveries to the dead-letter exchange with their cause.
        self.dead_letters = DeadLetters(transport, self.topology, self.worker_id)
        #: Ends crash loops: redelivered messages are counted, dead-lettered at the limit.
        self.redelivery = RedeliveryGuard(
            transport, plan.limits.delivery_limit, self.outbox.send_error,
            dead_letter=self.dead_letters.send,
        )
        #: Requests per input routing key (p.N / r.i) seen on the input shards.
        self.routing_keys: dict[str, int] = self._intake.routing_keys
        self._batch_ids = itertools.count()
        self._open_lots = 0
        self._settled = asyncio.Event()
        self._settled.set()
        #: Set when the worker can no longer consume a queue it should (see ``_watch``).
        self.failed = asyncio.Event()
        self._watchers: set[asyncio.Task[None]] = set()
        check_model_outputs(plan)
        #: Prometheus metrics (``workers.metrics``); ``metrics.registry`` is what to serve.
        self.metrics = WorkerMetrics(self)

    # -- public surface -------------------------------------------------------------------
    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def hosts_ingress(self) -> bool:
        return self.plan.stages[0].name in self.hosted

    @property
    def queues(self) -> list[str]:
        """The queues this worker consumes (or may consume after ``start_consuming``)."""
        return self._records.queues

    @property
    def providers(self) -> dict[str, str]:
        """Stage name -> execution provider its session actually got."""
        return {n: r.session.provider for n, r in self._runners.items() if r.session is not None}

    @property
    def ready(self) -> bool:
        """Running, with a consumer on every queue of its home stages (``/v2/health/ready``;
        the broker connection is the transport's to say)."""
        if self._state is not WorkerState.RUNNING:
            return False
        return all(
            rec.consumer is not None for rec in self._records if rec.stage in self.home
        )

    # -- metrics (workers.metrics.WorkerView) ---------------------------------------------
    @property
    def plan_hash(self) -> str:
        return self.plan.hash

    @property
    def first_stage(self) -> str:
        return self.plan.stages[0].name

    def metric_runners(self) -> Mapping[str, RunnerView]:
        return self._runners

    def metric_queues(self) -> list[QueueView]:
        return [
            QueueView(
                rec.queue, rec.stage, rec.prefetch, rec.consuming and rec.consumer is not None
            )
            for rec in self._records
        ]

    def metric_outbox(self) -> OutboxView:
        return OutboxView(self.outbox.unroutable_replies, self.outbox.expired_unsent)

    def __await__(self) -> Generator[Any, None, StageWorker]:
        """``await serve(...)`` starts the worker and returns it."""
        return self._started().__await__()

    async def _started(self) -> StageWorker:
        await self.start()
        return self

    async def __aenter__(self) -> StageWorker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _redeclare(self) -> None:
        """After a reconnect: the plan's topology again (idempotent; bindings a controller
        moved are kept, docs/scheduling.md "Who owns the bindings")."""
        await declare_plan_topology(self.transport, self.plan, durable=self.settings.durable)

    async def start(self) -> None:
        if self._state is not WorkerState.NEW:
            raise ConfigError(f"worker {self.worker_id} is {self._state.value}; start it once")
        self._state = WorkerState.STARTING
        try:
            if self._declare:
                await declare_plan_topology(
                    self.transport, self.plan, durable=self.settings.durable
                )
                if isinstance(self.transport, Reconnecting):
                    # A broker that lost non-durable topology (or an operator's delete)
                    # would leave this worker publishing into nothing.
                    self.transport.add_reconnect_callback(self._redeclare)
            self._runners.update(await build_runners(self.plan, self.settings, self.hosted,
                                                     self.hosts_ingress, self, self.worker_id))
            self._routes = build_routes(self.plan, self.hosted, self.hosts_ingress)
            link_runners(self._runners, self._routes)
            for runner in self._runners.values():
                runner.start()
            self._plan_consumers()
            for name in self.home:
                await self.start_consuming(name)
        except BaseException:
            await self._teardown()
            self._state = WorkerState.STOPPED
            raise
        self._state = WorkerState.RUNNING
        log.info(
            "worker %s serves plan %s stages %s (%s) on %s",
            self.worker_id,
            self.plan.short_hash,
            list(self.hosted),
            ", ".join(f"{k}: {v}" for k, v in self.providers.items()),
            ", ".join(self._records.queues) or "no queues",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop in stages: no new deliveries, finish in flight up to ``grace``, cancel the rest."""
        if self._state in (WorkerState.STOPPING, WorkerState.STOPPED, WorkerState.NEW):
            self._state = WorkerState.STOPPED
            return
        self._state = WorkerState.STOPPING
        grace = self.settings.grace if grace is None else grace
        for record in self._records.with_suspects():
            record.consuming = False
        try:
            await asyncio.wait_for(self._settled.wait(), grace)
        except TimeoutError:
            log.warning(
                "worker %s: %d deliveries still in flight after %.1f s grace; they will be "
                "redelivered",
                self.worker_id,
                self._open_lots,
                grace,
            )
        await self._teardown()
        self._state = WorkerState.STOPPED

    async def wait_settled(self, within: float) -> bool:
        """Wait until no delivery is unsettled; False if ``within`` seconds passed first."""
        try:
            await asyncio.wait_for(self._settled.wait(), within)
        except TimeoutError:
            return False
        return True

    async def set_prefetch(self, queue: str, prefetch: int) -> None:
        record = self._records.get(queue)
        if prefetch < 1:
            raise ConfigError(f"prefetch must be at least 1, got {prefetch}")
        record.base_prefetch = prefetch
        await self._apply_prefetch(record, prefetch)

    async def _apply_prefetch(self, record: ConsumerRecord, prefetch: int) -> None:
        record.prefetch = prefetch
        if record.consumer is not None:
            await record.consumer.set_prefetch(prefetch)

    async def start_consuming(self, stage: str, queue: str | None = None) -> None:
        """Consume ``queue`` of ``stage`` (default: its queues this worker was set up for)."""
        for record in self._records.for_stage(stage, queue, create=True):
            record.consuming = True
            if record.consumer is None:
                await self._consume(record)

    async def _consume(self, record: ConsumerRecord) -> None:
        """Consume ``record``'s queue, and its suspect queue unless that is consumed."""
        if record.suspect:
            self.redelivery.consuming(record.queue)
        consumer = await self.transport.consume(
            record.queue, self._handler(record), prefetch=record.prefetch
        )
        record.consumer = consumer
        wait_closed = getattr(consumer, "wait_closed", None)
        if wait_closed is not None:  # RabbitMQ: the broker ends it when the queue is deleted
            task = asyncio.create_task(self._watch(record, consumer, wait_closed()))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        suspects = record.suspects
        if suspects is not None and suspects.consumer is None:
            suspects.consuming = True
            await self._consume(suspects)

    async def _watch(self, record: ConsumerRecord, consumer: Consumer, closed: Any) -> None:
        """A consumer that ends while this worker still wants it (its queue was deleted):
        declare the plan's topology again and consume again; if that fails, the worker
        has failed (``failed`` is set; ``conveyor worker`` exits non-zero)."""
        await closed
        if record.consumer is not consumer or not record.consuming:
            return
        if self._state is not WorkerState.RUNNING:
            return
        log.error("worker %s: the consumer of %s ended (queue deleted?); declaring it again",
                  self.worker_id, record.queue)
        record.consumer = None
        try:
            await declare_plan_topology(self.transport, self.plan, durable=self.settings.durable)
            await self._consume(record)
        except ConveyorError as exc:
            log.error("worker %s: cannot consume %s again (%s); failing",
                      self.worker_id, record.queue, exc)
            self.failed.set()

    async def stop_consuming(self, stage: str, queue: str | None = None) -> None:
        """Take no more from ``stage``'s queue(s); finish their deliveries (up to the grace
        period), then cancel (what is still unsettled is redelivered to other workers)."""
        records = [r for rec in self._records.for_stage(stage, queue, create=False)
                   for r in rec.with_suspects()]
        for record in records:
            record.consuming = False
        for record in records:
            if record.lots:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(record.idle.wait(), self.settings.grace)
            if record.consumer is not None:
                consumer, record.consumer = record.consumer, None
                record.parked.clear()
                await consumer.cancel()

    def snapshot(self) -> ControlStats:
        """The figures the control agent sends in heartbeats (``conveyor.control``)."""
        return control_snapshot(
            first_stage=self.plan.stages[0].name,
            counters={name: r.counters for name, r in self._runners.items()},
            consuming=tuple(
                QueueConsumption(rec.queue, rec.stage, rec.prefetch)
                for rec in self._records
                if rec.consuming and rec.consumer is not None
            ),
            hosted=self.hosted,
            home=self.home,
            routing_keys=self.routing_keys,
            providers=self.providers,
        )

    def stats(self) -> WorkerStats:
        return WorkerStats(
            worker_id=self.worker_id,
            plan_hash=self.plan.hash,
            state=self._state.value,
            stages=tuple(r.counters.snapshot() for r in self._runners.values()),
            consumers=tuple(
                ConsumerStats(
                    queue=rec.queue,
                    stage=rec.stage,
                    prefetch=rec.prefetch,
                    unsettled=sum(len(r.lots) + len(r.parked) for r in rec.with_suspects()),
                    consuming=rec.consuming,
                )
                for rec in self._records
            ),
        )

    # -- Router (used by the runners) -----------------------------------------------------
    def next_batch_id(self) -> int:
        return next(self._batch_ids)

    async def route(self, source: str, batch: Batch, outputs: Mapping[str, Tensor]) -> None:
        dests = self._routes.destinations.get(source, [])
        reply_names = self._routes.replies.get(source, ())
        branches = len(dests) + (1 if reply_names else 0)
        if branches == 0:
            log.warning("stage %s: outputs go nowhere (plan lists no consumer)", source)
            for request in batch.requests:
                await request.token.done(Outcome.OK)
            return
        for request in batch.requests:
            request.token.fork(branches)
        timings = self._runners[source].timings
        for dest in dests:
            part = {name: outputs[name] for name in dest.names}
            if dest.local:
                await self._runners[dest.stage].accept_local(
                    source, Batch(batch.requests, part, batch.batch_id, batch.arrived)
                )
            else:
                self.outbox.spawn(
                    self.outbox.to_stage(
                        dest.stage, dest.join, source, batch.requests, part, timings
                    )
                )
        if reply_names:
            replies = {n: outputs[n] for n in reply_names}
            self.outbox.spawn(self.outbox.replies(batch.requests, replies, timings))

    async def fail(
        self,
        request: Request,
        error: ConveyorError,
        outcome: Outcome,
        *,
        reply: bool = True,
        stage: str | None = None,
    ) -> None:
        if stage == MODEL_INPUT:
            stage = self.first_stage
        await self.outbox.fail(request, error, outcome, reply=reply, stage=stage)

    # -- intake ---------------------------------------------------------------------------
    def _handler(self, record: ConsumerRecord) -> Any:
        async def handle(delivery: Delivery) -> None:
            if not record.consuming:
                # Stopping: hold it unsettled; it is redelivered when the consumer goes.
                record.parked.append(delivery)
                return
            if delivery.redelivered:
                self._runners[record.runner].timings.redelivered += 1
            ingress = record.runner == MODEL_INPUT
            runner = self._runners[record.runner]
            if not await self.redelivery.admit(
                delivery, record.stage, ingress=ingress, suspects=record.suspect_queue,
                suspect=record.suspect, join=runner.is_join,
            ):
                return
            lot = partial(self._lot, record, delivery)
            if ingress:
                await self._intake.request(delivery, lot)
                return
            await self._intake.stage_message(runner, delivery, lot)
            if runner.is_join and not record.suspect:
                await self._fit_join_window(record, runner)

        # Nothing before its first wait needs a task of its own (see conveyor.eager).
        return mark_eager(handle)

    def _settled_callback(self, record: ConsumerRecord) -> Callable[[Lot], None]:
        timings = self._runners[record.runner].timings

        def settled(lot: Lot) -> None:
            if lot.outcome is Outcome.FAILED:
                timings.dead_lettered += 1
            if record.suspect:
                self.redelivery.settled(record.queue, lot.delivery)
            record.lots.discard(lot)
            if not record.lots:
                record.idle.set()
            self._open_lots -= 1
            if self._open_lots == 0:
                self._settled.set()

        return settled

    def _lot(self, record: ConsumerRecord, delivery: Delivery, requests: int) -> Lot:
        if record.on_settled is None:
            record.on_settled = self._settled_callback(record)
            record.dead_letter = partial(
                self.dead_letters.send, stage=record.stage, queue=record.queue
            )
        lot = Lot(
            delivery, requests, record.on_settled, self.redelivery.requeue, record.dead_letter
        )
        record.lots.add(lot)
        record.idle.clear()
        self._open_lots += 1
        self._settled.clear()
        return lot

    async def _fit_join_window(self, record: ConsumerRecord, runner: StageRunner) -> None:
        """Parts stay unacked until their join runs, so a window full of parts waiting for
        partners queued behind them would never move: widen it (doubling, up to
        ``join_prefetch_max``); narrow it back once no part waits."""
        waiting = runner.pending_parts
        if waiting and len(record.lots) >= record.prefetch:
            wider = min(record.prefetch * 2, self.settings.join_prefetch_max)
            if wider > record.prefetch:
                log.info(
                    "join %s: %d parts wait for partners; prefetch of %s %d -> %d",
                    runner.name,
                    waiting,
                    record.queue,
                    record.prefetch,
                    wider,
                )
                await self._apply_prefetch(record, wider)
        elif not waiting and record.prefetch > record.base_prefetch:
            await self._apply_prefetch(record, record.base_prefetch)

    # -- building -------------------------------------------------------------------------
    def _plan_consumers(self) -> None:
        for name in self.home:
            for record in self._records.for_stage(name, None, create=True):
                record.consuming = True

    async def _teardown(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        for runner in self._runners.values():
            await runner.cancel()
        await self.outbox.drain(SETTLE_GRACE)
        for record in self._records.with_suspects():
            record.consuming = False
            record.parked.clear()
            if record.consumer is not None:
                consumer, record.consumer = record.consumer, None
                with contextlib.suppress(TransportError):
                    await consumer.cancel()
