"""One hosted stage (or the ingress): batch what arrives, run the session, hand outputs on.

Work reaches a runner two ways:

* from the broker (``submit`` / ``submit_part``): one request at a time, already decoded
  and validated; it waits in the micro-batcher, which releases batches of compatible shape;
* from a stage hosted in the same process (``accept_local``): a whole batch, possibly on
  the device, that runs as it is (no re-batching, no host copy).

A join runner first gathers a request's parts from all its sources (by request id for
broker parts, by batch id for local ones). Batches wait in a one-slot queue for the
session, so while the session is busy the batcher keeps filling the next batch. With the
``"idle"`` wait policy (``workers.batching``) the batcher releases a partial batch as soon
as the runner ``can_start`` one: nothing running, nothing in the slot (for the ingress:
the same of the local stages it hands its batches to). The session runs in a thread of
its own (inline when batches are quicker than the hop); its outputs go to
``Router.route``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from conveyor.envelope import RequestMeta
from conveyor.errors import ConveyorError, DeadlineExceeded, InferenceError
from conveyor.plan import StageSpec
from workers.batching import MicroBatcher, WaitPolicy, concat, shape_key
from workers.metrics import StageTimings
from workers.session import StageSession, Tensor
from workers.settlement import Obligation, Outcome
from workers.stats import StageCounters
from workers.tracing import StageTracer

log = logging.getLogger(__name__)

#: How many joined request ids a join remembers to recognise late duplicate parts.
JOINED_MEMORY = 65_536
#: Batches whose recent run time (measured on the event loop's thread, where no wait for
#: a thread or the GIL inflates it) is below this run there: a hop to the stage's thread
#: and back costs about as much as such a run.
INLINE_BELOW_MS = 0.5
#: A stage running on its thread runs one batch in this many on the loop to measure again.
INLINE_PROBE_EVERY = 200
#: Weight of the newest inline run in the average that keeps a stage on the loop.
_RUN_EWMA = 0.2


@dataclass
class Request:
    meta: RequestMeta
    rows: int
    token: Obligation
    #: ``time.perf_counter()`` when it reached the stage about to run it (batch wait).
    arrived: float = 0.0


@dataclass
class Batch:
    requests: list[Request]
    tensors: dict[str, Tensor]
    batch_id: int
    #: When all its requests reached this stage at once (a batch handed on in memory):
    #: that ``time.perf_counter()``, so its batch wait is one observation of n. None: each
    #: request's own ``arrived`` (a batch made by the batcher).
    arrived: float | None = None


@dataclass
class Item:
    """One request waiting to be batched (host arrays)."""

    request: Request
    tensors: dict[str, np.ndarray]
    #: Batched with nothing else: the message came back after its worker died, and
    #: neighbours must not die with it again (``workers.redelivery``).
    alone: bool = False


@dataclass
class _PartialJoin:
    started: float
    parts: dict[str, Item] = field(default_factory=dict)


class Router(Protocol):
    def next_batch_id(self) -> int: ...
    async def route(self, source: str, batch: Batch, outputs: Mapping[str, Tensor]) -> None: ...
    async def fail(
        self,
        request: Request,
        error: ConveyorError,
        outcome: Outcome,
        *,
        reply: bool = True,
        stage: str | None = None,
    ) -> None: ...


def deadline_error(meta: RequestMeta, where: str) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"request {meta.request_id!r} passed its deadline before {where} ran it; not run"
    )


class StageRunner:
    """Batches and runs one stage; ``session=None`` is the ingress (outputs = inputs)."""

    def __init__(
        self,
        name: str,
        spec: StageSpec | None,
        session: StageSession | None,
        router: Router,
        *,
        max_batch: int,
        max_delay_ms: float,
        sources: tuple[str, ...],
        join_timeout: float = 60.0,
        batch_wait: WaitPolicy = "idle",
    ) -> None:
        self.name = name
        self.spec = spec
        self.session = session
        self.router = router
        self.sources = sources
        self.join_timeout = join_timeout
        self.counters = StageCounters(
            name, session.provider if session else "", max_batch, max_delay_ms
        )
        self.timings = StageTimings()
        #: Records a span per request when OpenTelemetry is set up (``workers.tracing``).
        self.tracer: StageTracer | None = None
        self.batcher: MicroBatcher[Item] = MicroBatcher(
            max_batch, max_delay_ms, policy=batch_wait, can_run=self.can_start
        )
        #: Local runners this one hands every batch to (set for the ingress): it can start
        #: a batch only when they can.
        self.hands_to: list[StageRunner] = []
        #: Runners whose ``can_start`` depends on this one (told when it frees up).
        self.fed_by: list[StageRunner] = []
        self._executing = False
        self._ready: asyncio.Queue[Batch] = asyncio.Queue(maxsize=1)
        self._broker_joins: dict[str, _PartialJoin] = {}
        #: Request ids this join ran lately, to ack late duplicates of their parts.
        self._joined: OrderedDict[str, None] = OrderedDict()
        self._local_joins: dict[int, dict[str, Batch]] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{name}")
        #: Average milliseconds of ``session.run`` per batch, measured on the loop.
        self._run_ms = 0.0
        #: Batches run on the stage's thread since the last measurement (-1: none yet).
        self._on_thread = -1
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = 0

    @property
    def is_join(self) -> bool:
        return len(self.sources) > 1

    @property
    def pending_parts(self) -> int:
        """Broker parts held while a join waits for the other parts of their requests."""
        return sum(len(p.parts) for p in self._broker_joins.values())

    def can_start(self) -> bool:
        """True when a batch released now would start at once: nothing runs or waits here
        (nor in the stages this one hands its batches to)."""
        if self._executing or not self._ready.empty():
            return False
        return all(r.can_start() for r in self.hands_to)

    def _freed(self) -> None:
        self.batcher.poke()
        for runner in self.fed_by:
            runner._freed()

    @property
    def busy(self) -> bool:
        """True while any request is waiting or running here."""
        return self.counters.in_flight > 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        for coro in (self._feed(), self._execute()):
            task = asyncio.create_task(coro, name=f"conveyor-{self.name}")
            self._tasks.add(task)
        if self.is_join:
            task = asyncio.create_task(self._sweep_joins(), name=f"conveyor-{self.name}-joins")
            self._tasks.add(task)

    async def cancel(self) -> None:
        """Stop at once; what is not handed on yet is redelivered (its lot never settles)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self.batcher.take_all()
        self._broker_joins.clear()
        self._local_joins.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- intake ---------------------------------------------------------------------------
    def submit(self, item: Item) -> None:
        """A request from the broker, validated, for a non-join stage or the ingress."""
        self.counters.in_flight += 1
        key = ("alone", id(item)) if item.alone else shape_key(item.tensors)
        self.batcher.put(item, key, item.request.rows)

    async def submit_part(self, source: str, item: Item) -> None:
        """A broker part of a request: batch it once every source has delivered its part."""
        if not self.is_join:
            self.submit(item)
            return
        rid = item.request.meta.request_id
        if rid in self._joined:
            # A late duplicate (redelivered upstream) of a request this join already ran.
            await item.request.token.done(Outcome.OK)
            return
        partial = self._broker_joins.setdefault(rid, _PartialJoin(time.monotonic()))
        if source in partial.parts:
            # A redelivered duplicate of a part we hold: its own token is done as is.
            await item.request.token.done(Outcome.OK)
            return
        partial.parts[source] = item
        if len(partial.parts) < len(self.sources):
            return
        del self._broker_joins[rid]
        self._joined[rid] = None
        if len(self._joined) > JOINED_MEMORY:
            self._joined.popitem(last=False)
        parts = list(partial.parts.values())
        token = Obligation([p.request.token for p in parts])
        tensors: dict[str, np.ndarray] = {}
        for p in parts:
            tensors.update(p.tensors)
        arrived = max(p.request.arrived for p in parts)  # complete once the last part came
        merged = Request(parts[0].request.meta, parts[0].request.rows, token, arrived)
        self.submit(Item(merged, tensors, alone=any(p.alone for p in parts)))

    async def accept_local(self, source: str, batch: Batch) -> None:
        """A batch from a stage in this process (or the ingress)."""
        self.counters.in_flight += len(batch.requests)
        if not self.is_join:
            await self._ready.put(batch)
            return
        parts = self._local_joins.setdefault(batch.batch_id, {})
        parts[source] = batch
        if len(parts) < len(self.sources):
            return
        del self._local_joins[batch.batch_id]
        tensors: dict[str, Tensor] = {}
        for part in parts.values():
            tensors.update(part.tensors)
        times = [p.arrived for p in parts.values()]
        # Complete once its last part came.
        arrived = None if None in times else max(t for t in times if t is not None)
        # The request tokens forked once per source; the join turns them back into one.
        for request in batch.requests:
            for _ in range(len(parts) - 1):
                await request.token.done(Outcome.OK)
        self.counters.in_flight -= len(batch.requests) * (len(parts) - 1)
        await self._ready.put(Batch(batch.requests, tensors, batch.batch_id, arrived))

    # -- the loops ------------------------------------------------------------------------
    async def _feed(self) -> None:
        while True:
            items = await self.batcher.next_batch()
            live: list[Item] = []
            now = time.time()
            for item in items:
                if item.request.meta.expired(now):
                    self.counters.expired += 1
                    self.counters.in_flight -= 1
                    error = deadline_error(item.request.meta, f"stage {self.name!r}")
                    await self._fail(item.request, error, Outcome.OK)
                else:
                    live.append(item)
            if not live:
                continue
            batch = Batch(
                [i.request for i in live],
                concat([i.tensors for i in live]),
                self.router.next_batch_id(),
            )
            await self._ready.put(batch)

    async def _execute(self) -> None:
        while True:
            batch = await self._ready.get()
            self._executing = True
            try:
                await self._run_batch(batch)
            finally:
                self._executing = False
                self.counters.in_flight -= len(batch.requests)
                self._freed()

    async def _run_batch(self, batch: Batch) -> None:
        self.timings.tick()
        rows = sum(r.rows for r in batch.requests)
        if self.session is None:
            self.counters.record_batch(len(batch.requests), rows, 0.0)
            await self.router.route(self.name, batch, batch.tensors)
            return
        started = time.perf_counter()
        timings = self.timings
        if timings.enabled:
            if batch.arrived is not None:
                timings.batch_wait.observe_n(started - batch.arrived, len(batch.requests))
            else:
                timings.batch_wait.observe_all([started - r.arrived for r in batch.requests])
        try:
            outputs = await self._infer(batch.tensors)
        except InferenceError as exc:
            self.counters.errors += 1
            await self._isolate_failure(batch, exc)
            return
        finished = time.perf_counter()
        self.counters.record_batch(len(batch.requests), rows, finished - started)
        if self.tracer is not None:
            self.tracer.record(batch.requests, started, finished, None)
        if timings.enabled:
            timings.compute.observe(finished - started)
            timings.batch_size.observe(len(batch.requests))
        # At the next stage hosted here it arrives now: one number for the batch (its
        # batch wait), and each request's own only where spans start from it.
        batch.arrived = finished
        if self.tracer is not None:
            for request in batch.requests:
                request.arrived = finished
        await self.router.route(self.name, batch, outputs)

    async def _fail(
        self, request: Request, error: ConveyorError, outcome: Outcome, *, reply: bool = True
    ) -> None:
        self.timings.failed(error.code)
        await self.router.fail(request, error, outcome, reply=reply, stage=self.name)

    async def _infer(self, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self.session is not None
        feeds = {name: tensors[name] for name in self.session.input_names}
        if self._run_ms < INLINE_BELOW_MS or self._on_thread >= INLINE_PROBE_EVERY:
            # Quick batches cost less than the hop to a thread and back: run them here.
            # The first batch, and one in INLINE_PROBE_EVERY of a slow stage, run here too
            # to measure (a run on the thread would count waits for the GIL).
            return self._timed_run(feeds)
        self._on_thread += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.session.run_bound, feeds)

    def _timed_run(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        assert self.session is not None
        started = time.perf_counter()
        outputs = self.session.run_bound(feeds)
        ms = (time.perf_counter() - started) * 1000.0
        # The first run (often slowed by warm-up) and a probe from the thread decide on
        # their own; runs staying on the loop are averaged.
        fresh = self._on_thread != 0
        self._run_ms = ms if fresh else (1 - _RUN_EWMA) * self._run_ms + _RUN_EWMA * ms
        self._on_thread = 0
        return outputs

    async def _isolate_failure(self, batch: Batch, error: InferenceError) -> None:
        """A batch failed: run its requests one by one so only the bad ones fail."""
        host = all(isinstance(t, np.ndarray) for t in batch.tensors.values())
        if len(batch.requests) == 1 or not host:
            for request in batch.requests:
                await self._fail(request, error, Outcome.FAILED)
            return
        offset = 0
        for request in batch.requests:
            piece = {k: v[offset : offset + request.rows] for k, v in batch.tensors.items()}
            offset += request.rows
            single = Batch([request], piece, self.router.next_batch_id())
            try:
                outputs = await self._infer(piece)
            except InferenceError as exc:
                await self._fail(request, exc, Outcome.FAILED)
                continue
            single.arrived = request.arrived = time.perf_counter()
            self.timings.isolated_ok += 1
            await self.router.route(self.name, single, outputs)

    async def _sweep_joins(self) -> None:
        """Give up on partial joins past their deadline or ``join_timeout``."""
        while True:
            await asyncio.sleep(min(1.0, self.join_timeout / 4))
            now = time.monotonic()
            for rid, partial in list(self._broker_joins.items()):
                meta = next(iter(partial.parts.values())).request.meta
                expired = meta.expired()
                if not expired and now - partial.started < self.join_timeout:
                    continue
                del self._broker_joins[rid]
                missing = sorted(set(self.sources) - set(partial.parts))
                error: ConveyorError
                if expired:
                    error, outcome = deadline_error(meta, f"join {self.name!r}"), Outcome.OK
                    self.counters.expired += 1
                else:
                    error = InferenceError(
                        f"join {self.name!r} waited {self.join_timeout:.0f} s for parts from "
                        f"{missing} of request {rid!r}; gave up",
                        stage=self.name,
                    )
                    outcome = Outcome.FAILED
                    self.counters.errors += 1
                for n, item in enumerate(partial.parts.values()):
                    await self._fail(item.request, error, outcome, reply=n == 0)


def stage_sources(spec: StageSpec) -> tuple[str, ...]:
    """Where a stage's inputs come from: upstream stage names and/or ``MODEL_INPUT``."""
    seen: dict[str, None] = {}
    for i in spec.inputs:
        seen.setdefault(i.source, None)
    return tuple(seen)
