"""What a worker does with a delivery before batching: decode it, admit its requests.

``Intake`` serves one ``StageWorker``. A message on an input shard is one request (docs/
wire.md sections 1-2) or a request pack (section 7); a message on a stage queue is a stage
message (section 6). Each request is checked against the plan (plan hash, deadline, tensor
names, dtypes and fixed dimensions) and handed to its runner's batcher, or answered:

* expired: ``DeadlineExceeded``, and its branch ends OK (acked, not run);
* wrong plan or source, bad tensors: the error, and its branch FAILED (dead-lettered);
* on the input shards, more rows or bytes than the plan's ``limits`` allow (or a pack of
  more than ``pack_requests`` when the input queues are bounded): ``RequestTooLarge``,
  dead-lettered;
* a ``reply_to`` outside the plan's reply queues (``Topology.is_reply_queue``): logged as
  an error and dead-lettered, never answered nor run;
* on the input shards, a ``reply_to`` missing for a grace of 5 s (its caller is gone,
  ``workers.callers``): acked and dropped unrun, counted as outcome ``caller_gone``,
  logged at INFO (rate-limited); requests without ``reply_to`` run as before;
* an unreadable message: dead-lettered, its envelope's request told when it names one.

The ``lot`` callable makes the delivery's settlement for ``n`` requests
(``workers.settlement.Lot``); the delivery is settled once every request is done.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from conveyor import wire
from conveyor.envelope import RequestMeta
from conveyor.errors import (
    CodecError,
    ConveyorError,
    DeadlineExceeded,
    PlanError,
    PlanHashMismatch,
    RequestTooLarge,
)
from conveyor.packs import CLIENT_SOURCE, StageMessage, read_requests, request_pieces
from conveyor.plan import MODEL_INPUT, Plan, TensorSpec
from conveyor.topology import Topology
from conveyor.transport import Delivery, Message
from workers.callers import Callers
from workers.outbox import Outbox
from workers.redelivery import deaths_before
from workers.runner import Item, Request, StageRunner, deadline_error
from workers.settlement import Cause, Lot, Outcome

log = logging.getLogger(__name__)

#: Makes the settlement of the delivery at hand for ``n`` requests.
LotFactory = Callable[[int], Lot]
#: The outcome (``conveyor_requests_total``) of a request whose caller was gone.
CALLER_GONE = "caller_gone"


class Intake:
    def __init__(
        self, plan: Plan, runners: Mapping[str, StageRunner], outbox: Outbox
    ) -> None:
        self.plan = plan
        self.runners = runners
        self.outbox = outbox
        #: Requests per input routing key (p.N / r.i) seen on the input shards.
        self.routing_keys: dict[str, int] = {}
        self._input_specs = {t.name: t for t in plan.inputs}
        self._input_check = TensorCheck(self._input_specs)
        self._input_batch_fixed = any(_fixed(t.shape[0]) for t in plan.inputs if t.shape)
        self._topology = Topology.of(plan)
        #: Reply queues seen to be of the plan's scheme (a client's requests share one).
        self._reply_queues: set[str] = set()
        self.callers = Callers(outbox.transport)

    # -- input shards ---------------------------------------------------------------------
    async def request(self, delivery: Delivery, lot: LotFactory) -> None:
        """A message on an input shard: one request, or a pack of them; each goes on as if
        it had come alone."""
        ingress = self.runners[MODEL_INPUT]
        msg = await self._decode(ingress, delivery, lot, ingress=True)
        if msg is None:
            return
        self._count_key(delivery.routing_key, len(msg.requests))
        wrong_source = (
            None
            if msg.source == CLIENT_SOURCE
            else PlanError(f"a request pack must say src {CLIENT_SOURCE!r}, not {msg.source!r}")
        )

        def check(tensors: Mapping[str, np.ndarray]) -> None:
            self._model_inputs(tensors)

        alone = deaths_before(delivery.message) > 0

        async def submit(item: Item) -> None:
            item.alone = alone
            ingress.submit(item)

        await self._admit(
            ingress, msg, lot, wrong_source, check, self._input_batch_fixed, submit,
            limited=True,
        )

    # -- stage queues ---------------------------------------------------------------------
    async def stage_message(self, runner: StageRunner, delivery: Delivery, lot: LotFactory) -> None:
        """A message on a stage queue: a batch of requests from another stage's worker."""
        assert runner.spec is not None
        msg = await self._decode(runner, delivery, lot, ingress=False)
        if msg is None:
            return
        specs = {i.tensor.name: i.tensor for i in runner.spec.inputs if i.source == msg.source}
        what = f"stage {runner.name!r} input from {msg.source!r}"
        wrong_source = (
            None
            if msg.source in runner.sources
            else PlanError(f"stage {runner.name!r} does not read from {msg.source!r}")
        )

        def check(tensors: Mapping[str, np.ndarray]) -> None:
            check_tensors(tensors, specs, what)

        alone = deaths_before(delivery.message) > 0

        async def submit(item: Item) -> None:
            item.alone = alone
            await runner.submit_part(msg.source, item)

        per_request = any(_fixed(spec.shape[0]) for spec in specs.values() if spec.shape)
        await self._admit(runner, msg, lot, wrong_source, check, per_request, submit)

    # -- shared steps ---------------------------------------------------------------------
    async def _decode(
        self, runner: StageRunner, delivery: Delivery, lot: LotFactory, *, ingress: bool
    ) -> StageMessage | None:
        try:
            return read_requests(delivery.message, ingress=ingress)
        except CodecError as exc:
            runner.counters.errors += 1
            runner.timings.failed(exc.code)
            await self._fail_unparsed(lot(1), delivery.message, exc, self._stage(runner))
            return None

    async def _admit(
        self,
        runner: StageRunner,
        msg: StageMessage,
        lot: LotFactory,
        wrong_source: ConveyorError | None,
        check: Callable[[Mapping[str, np.ndarray]], None],
        per_request: bool,
        submit: Callable[[Item], Any],
        *,
        limited: bool = False,
    ) -> None:
        """Admit each request of a pack or stage message on its own. The requests' rows
        share the message's dtypes and dims 1..n, so the tensors are checked once for
        all (per request only when a spec fixes the batch dimension itself). ``limited``:
        requests from clients, held to the plan's size limits and run only while their
        caller is there."""
        settlement = lot(len(msg.requests))
        arrived = time.perf_counter()
        if msg.at is not None and runner.timings.enabled:
            # Clocks of other hosts may run ahead: the histogram counts a negative as 0.
            runner.timings.queue_wait.observe_n(time.time() - msg.at, len(msg.requests))
        bad: CodecError | None = self._pack_error(msg) if limited else None
        if bad is None and not per_request:
            try:
                check(msg.tensors)
            except CodecError as exc:
                bad = exc
        for (meta, rows), piece in zip(msg.requests, request_pieces(msg), strict=True):
            request = Request(meta, rows, settlement.request(), arrived)
            if meta.reply_to is not None and not self._reply_queue_ok(meta):
                runner.counters.errors += 1
                await request.token.done(Outcome.FAILED, self._reply_queue_cause(runner, meta))
                continue
            if limited and meta.reply_to is not None and await self.callers.gone(meta.reply_to):
                runner.timings.failed(CALLER_GONE)
                self.outbox.request_log.dropped(
                    meta, CALLER_GONE, "its reply queue is gone (the caller left)",
                    stage=self._stage(runner),
                )
                await request.token.done(Outcome.OK)
                continue
            error = self._admission_error(meta, msg.plan_hash) or wrong_source
            if error is not None:
                await self._refuse(runner, request, error)
                continue
            try:
                if bad is not None:
                    raise bad
                if per_request:
                    check(piece)
                if limited:
                    self._check_size(meta, rows, piece)
            except CodecError as exc:
                runner.counters.errors += 1
                runner.timings.failed(exc.code)
                await self.outbox.fail(request, exc, Outcome.FAILED, stage=self._stage(runner))
                continue
            await submit(Item(request, piece))

    def _reply_queue_ok(self, meta: RequestMeta) -> bool:
        reply_to = meta.reply_to
        if reply_to in self._reply_queues:
            return True
        if reply_to is not None and self._topology.is_reply_queue(reply_to):
            if len(self._reply_queues) > 10_000:
                self._reply_queues.clear()
            self._reply_queues.add(reply_to)
            return True
        log.error(
            "request %s names reply queue %r, not one of this plan's (%s.reply.<id>); "
            "dead-lettered, not run",
            meta.request_id, reply_to, self._topology.base,
        )
        return False

    def _reply_queue_cause(self, runner: StageRunner, meta: RequestMeta) -> Cause:
        error = CodecError(
            f"request {meta.request_id} names reply queue {meta.reply_to!r}, not one of "
            f"plan {self.plan.name!r}'s ({self._topology.base}.reply.<id>); not run nor "
            "answered: send it with a reply queue of the plan's scheme"
        )
        return Cause.of(error, meta, self._stage(runner))

    def _pack_error(self, msg: StageMessage) -> RequestTooLarge | None:
        """A pack larger than the plan's ``pack_requests`` breaks the input queues' bound in
        requests (each message may hold that many): refused when they are bounded."""
        limits = self.plan.limits
        if limits.max_queued_requests is None or len(msg.requests) <= limits.pack_requests:
            return None
        return RequestTooLarge(
            f"a request pack of {len(msg.requests)} requests exceeds the plan's "
            f"limits.pack_requests={limits.pack_requests} (the input queues hold "
            f"{limits.max_queued_requests} requests, {limits.pack_requests} per message); "
            "send smaller packs"
        )

    def _check_size(self, meta: RequestMeta, rows: int, piece: Mapping[str, np.ndarray]) -> None:
        limits = self.plan.limits
        if limits.max_request_rows is not None and rows > limits.max_request_rows:
            raise RequestTooLarge(
                f"request {meta.request_id} has {rows} rows; plan {self.plan.name!r} allows at "
                f"most {limits.max_request_rows} per request (limits.max_request_rows): "
                "split it into smaller requests"
            )
        if limits.max_request_bytes is not None:
            size = sum(a.nbytes for a in piece.values())
            if size > limits.max_request_bytes:
                raise RequestTooLarge(
                    f"request {meta.request_id} carries {size} bytes of tensors; plan "
                    f"{self.plan.name!r} allows at most {limits.max_request_bytes} "
                    "(limits.max_request_bytes): split it into smaller requests"
                )

    def _count_key(self, key: str, requests: int) -> None:
        self.routing_keys[key] = self.routing_keys.get(key, 0) + requests

    def _admission_error(
        self, meta: RequestMeta, plan_hash: str | None = None
    ) -> ConveyorError | None:
        named = plan_hash if plan_hash is not None else meta.plan_hash
        if named is not None and not same_plan(self.plan.hash, named):
            return PlanHashMismatch(self.plan.hash, named)
        if meta.expired():
            return deadline_error(meta, "any stage")
        return None

    async def _refuse(self, runner: StageRunner, request: Request, error: ConveyorError) -> None:
        """Answer a request refused at admission: an expired one is acked (dropped, not
        run); any other refusal (plan hash, wrong source) is dead-lettered."""
        runner.timings.failed(error.code)
        if isinstance(error, DeadlineExceeded):
            runner.counters.expired += 1
            await self.outbox.fail(request, error, Outcome.OK, stage=self._stage(runner))
        else:
            runner.counters.errors += 1
            await self.outbox.fail(request, error, Outcome.FAILED, stage=self._stage(runner))

    async def _fail_unparsed(
        self, lot: Lot, message: Message, error: CodecError, stage: str
    ) -> None:
        """A message we cannot read: dead-letter it; answer if its envelope allows."""
        meta: RequestMeta | None = None
        with contextlib.suppress(CodecError):
            meta = RequestMeta.from_message(message)  # the envelope may be sound
        if meta is None and message.message_id and message.reply_to:
            with contextlib.suppress(CodecError):
                meta = RequestMeta(message.message_id, reply_to=message.reply_to)
        if meta is not None:
            self.outbox.request_log.failure(meta, error, stage=None, dead_lettered=True)
        if meta is not None and meta.reply_to:
            await self.outbox.send_error(meta, error)
        else:
            log.warning("dead-lettering an unreadable message: %s", error)
        await lot.done(Outcome.FAILED, Cause.of(error, meta, stage))

    def _stage(self, runner: StageRunner) -> str:
        """The plan stage a runner's failures are reported under (the ingress: the first)."""
        return self.plan.stages[0].name if runner.name == MODEL_INPUT else runner.name

    def _model_inputs(self, tensors: Mapping[str, np.ndarray]) -> None:
        """``CodecError`` unless ``tensors`` fit the plan's inputs."""
        if not self._input_check.passes(tensors):
            check_tensors(tensors, self._input_specs, "request")  # raises, naming why


def same_plan(ours: str, named: str) -> bool:
    """The full hash, or a prefix of at least 16 digits (``Plan.short_hash``), matches."""
    return named == ours or (len(named) >= 16 and ours.startswith(named))


def check_tensors(
    tensors: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec], what: str
) -> None:
    """``CodecError`` naming the first tensor that is missing, unknown or off its spec."""
    missing = sorted(set(specs) - set(tensors))
    if missing:
        raise CodecError(f"{what} lacks tensor(s) {missing}; expected {sorted(specs)}")
    extra = sorted(set(tensors) - set(specs))
    if extra:
        raise CodecError(f"{what} has unknown tensor(s) {extra}; expected {sorted(specs)}")
    for name, array in tensors.items():
        wire.check_tensor(name, array, specs[name])


def _fixed(dim: int | str) -> bool:
    return isinstance(dim, int) and dim >= 0


class TensorCheck:
    """The common case of ``check_tensors`` in a few comparisons (True: all match)."""

    def __init__(self, specs: Mapping[str, TensorSpec]) -> None:
        self._names = set(specs)
        self._checks = [
            (
                name,
                np.dtype(spec.dtype),
                len(spec.shape),
                [(axis, d) for axis, d in enumerate(spec.shape) if _fixed(d)],
            )
            for name, spec in specs.items()
        ]

    def passes(self, tensors: Mapping[str, np.ndarray]) -> bool:
        if tensors.keys() != self._names:
            return False
        for name, dtype, rank, fixed in self._checks:
            array = tensors[name]
            if array.dtype != dtype or array.ndim != rank:
                return False
            for axis, size in fixed:
                if array.shape[axis] != size:
                    return False
        return True
