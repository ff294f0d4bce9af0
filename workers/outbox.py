"""Everything a worker sends: stage messages, replies and error replies.

Each send that settles inputs (publish, then mark the requests' branches done, which may
ack their deliveries) runs as a task of its own (``spawn``): cancelling whoever routed the
batch cannot lose a result that is already out (STYLE point 6). Replies to a batch start
at once, one after the other (``conveyor.eager.step``); one whose publish must wait for a
confirm goes on as a task, so they still wait for their confirms together. ``drain`` is the
shutdown step that lets them finish. A failed publish marks the branch ``RETRY``, so the
input is requeued and runs again; a reply to a queue that no longer exists (the client
left) counts as done.

A next stage whose queue is full (``BackpressureError``: ``reject-publish``) is not a
failure: the send backs off (``BACKOFF_FIRST_S`` doubling up to ``BACKOFF_MAX_S``) and tries
again while any of its requests may still be answered, holding its inputs unsettled, so
the worker's prefetch window fills and it stops taking work instead of spinning. Replies go
only to queues of the plan's reply scheme (``Topology.is_reply_queue``).

Every publish for requests waits for its confirm at most until their (last) deadline, and
``PUBLISH_GRACE_S`` at least: a broker that blocks publishers (a memory or disk alarm)
holds a worker's inputs no longer than that, not for the transport's whole confirm
timeout. A publish that fails once its requests' deadline has passed drops them as
expired (their inputs are acked, not run again; no error reply, whose publish would wait
on the same block while the caller's own deadline has already ended its wait).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import numpy as np

from conveyor import wire
from conveyor.eager import step
from conveyor.envelope import RequestMeta, reply_error, reply_ok
from conveyor.errors import BackpressureError, ConveyorError, TransportError, UnroutableError
from conveyor.packs import encode_stage_message, pack_replies
from conveyor.topology import Topology
from conveyor.transport import Message, Throttled, Transport
from workers.batching import split
from workers.logs import RequestLog
from workers.metrics import StageTimings
from workers.runner import Request
from workers.session import StageSession, Tensor
from workers.settlement import Cause, Outcome

log = logging.getLogger(__name__)

#: Back-off of a publish refused by a full next-stage queue: first wait, and its cap.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0
#: A publish for requests whose deadline is (nearly) past still waits this long for its
#: confirm (an error reply about an expired request, say).
PUBLISH_GRACE_S = 0.5


class Outbox:
    def __init__(self, transport: Transport, topology: Topology, plan_hash: str) -> None:
        self.transport = transport
        self.topology = topology
        self.plan_hash = plan_hash
        self._tasks: set[asyncio.Task[None]] = set()
        self.request_log = RequestLog(log)
        #: Publishes refused by a full queue and retried after a back-off.
        self.backoffs = 0
        #: Replies that reached no queue (their request id is logged at WARNING).
        self.unroutable_replies = 0
        #: Requests whose outputs or replies were not confirmed before their deadline
        #: (dropped as expired; logged at WARNING, first and every 100th).
        self.expired_unsent = 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, within: float) -> None:
        """Let sends under way finish for up to ``within`` seconds, then cancel them."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(list(self._tasks), timeout=within)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def fail(
        self,
        request: Request,
        error: ConveyorError,
        outcome: Outcome,
        *,
        reply: bool = True,
        stage: str | None = None,
    ) -> None:
        """End one branch of ``request`` with ``outcome``, answering the client first."""
        dead = outcome is Outcome.FAILED
        self.request_log.failure(
            request.meta, error, stage=stage, dead_lettered=dead,
            level=logging.WARNING if dead else logging.INFO,
        )
        if reply:
            await self.send_error(request.meta, error)
        await request.token.done(outcome, Cause.of(error, request.meta, stage) if dead else None)

    async def to_stage(
        self,
        stage: str,
        join: bool,
        source: str,
        requests: list[Request],
        part: Mapping[str, Tensor],
        timings: StageTimings,
    ) -> None:
        """Publish ``source``'s tensors for ``stage``: one message for the whole batch, or
        one per request to a join (routed by consistent hash on the request id)."""
        host = {k: StageSession.to_host(v) for k, v in part.items()}
        exchange = self.topology.stage_exchange(stage)
        if not join:
            batch = [(r.meta, r.rows) for r in requests]
            message = encode_stage_message(self.plan_hash, source, batch, host)
            started = time.perf_counter()
            outcome = await self._publish(exchange, message, stage, requests)
            if timings.enabled:
                timings.publish.observe(time.perf_counter() - started)
            for request in requests:
                await request.token.done(outcome)
            return
        pieces = split(host, [r.rows for r in requests])

        async def one(request: Request, tensors: dict[str, np.ndarray]) -> None:
            single = [(request.meta, request.rows)]
            message = encode_stage_message(self.plan_hash, source, single, tensors)
            started = time.perf_counter()
            outcome = await self._publish(exchange, message, request.meta.request_id, [request])
            timings.publish.observe(time.perf_counter() - started)
            await request.token.done(outcome)

        await asyncio.gather(*(one(r, p) for r, p in zip(requests, pieces, strict=True)))

    async def replies(
        self, requests: list[Request], outputs: Mapping[str, Tensor], timings: StageTimings
    ) -> None:
        """Send each request its rows of the model outputs."""
        host = {k: StageSession.to_host(v) for k, v in outputs.items()}
        try:
            pieces = split(host, [r.rows for r in requests])
        except ValueError as exc:
            error = ConveyorError(f"cannot split the batch outputs per request: {exc}")
            for request in requests:
                timings.failed(error.code)
                await self.fail(request, error, Outcome.FAILED)
            return
        started = time.perf_counter()
        await _send_all(self._reply_sends(requests, pieces, host))
        if not timings.enabled:
            return
        timings.publish.observe(time.perf_counter() - started)
        now = time.time()
        # A sender's clock may run ahead of ours: the histogram counts a negative as 0.
        timings.end_to_end.observe_all(
            [now - sent for r in requests if (sent := r.meta.sent) is not None]
        )

    def _reply_sends(
        self,
        requests: list[Request],
        pieces: list[dict[str, np.ndarray]],
        host: dict[str, np.ndarray],
    ) -> list[Coroutine[Any, Any, None]]:
        """One send per reply message: requests of clients that read reply packs get one
        message per reply queue, the others one each."""
        singles: list[tuple[Request, dict[str, np.ndarray]]] = []
        groups: dict[str, list[tuple[Request, dict[str, np.ndarray]]]] = {}
        for request, piece in zip(requests, pieces, strict=True):
            reply_to = request.meta.reply_to
            if request.meta.packed_replies and reply_to is not None:
                groups.setdefault(reply_to, []).append((request, piece))
            else:
                singles.append((request, piece))
        sends: list[Coroutine[Any, Any, None]] = []
        for group in groups.values():
            if len(group) == 1:
                singles.append(group[0])
            elif len(group) == len(requests):
                sends.append(self._packed([r for r, _ in group], host))  # the batch as it is
            else:
                stacked = {k: np.concatenate([p[k] for _, p in group]) for k in host}
                sends.append(self._packed([r for r, _ in group], stacked))
        sends.extend(self._one(request, piece) for request, piece in singles)
        return sends

    async def _one(self, request: Request, tensors: dict[str, np.ndarray]) -> None:
        outcome = Outcome.OK
        if request.meta.reply_to is not None:
            message = reply_ok(request.meta, wire.encode(tensors))
            outcome = await self._send_reply(request.meta, message, _deadline_of([request.meta]))
        await request.token.done(outcome)

    async def _packed(self, group: list[Request], tensors: dict[str, np.ndarray]) -> None:
        message = pack_replies([(r.meta.request_id, r.rows) for r in group], tensors)
        deadline = _deadline_of([r.meta for r in group])
        outcome = await self._send_reply(group[0].meta, message, deadline)
        for request in group:
            await request.token.done(outcome)

    async def send_error(self, meta: RequestMeta, error: ConveyorError) -> None:
        if meta.reply_to is not None:
            await self._send_reply(meta, reply_error(meta, error), _deadline_of([meta]))

    async def _publish(
        self, exchange: str, message: Message, routing_key: str, requests: list[Request]
    ) -> Outcome:
        wait = BACKOFF_FIRST_S
        deadline = _deadline_of([r.meta for r in requests])
        while True:
            if self._blocked_past(deadline):
                return self._expired(exchange, len(requests), "the broker blocks publishes")
            try:
                await self.transport.publish(
                    exchange, message, routing_key, timeout=_confirm_bound(deadline)
                )
            except BackpressureError as exc:
                left = deadline - time.time()
                if left <= 0:
                    log.info("%s is full and the requests' deadlines passed; not sent", exchange)
                    return Outcome.OK  # expired: dropped as the next stage would drop them
                if self.backoffs % 100 == 0:
                    log.warning("%s is full (%s); backing off (%d so far)", exchange, exc,
                                self.backoffs + 1)
                self.backoffs += 1
                await asyncio.sleep(min(wait, left))
                wait = min(wait * 2, BACKOFF_MAX_S)
            except TransportError as exc:
                if time.time() >= deadline:
                    return self._expired(exchange, len(requests), exc)
                log.warning(
                    "publish to %s failed (%s); the input will be redelivered", exchange, exc
                )
                return Outcome.RETRY
            else:
                return Outcome.OK

    def _blocked_past(self, deadline: float) -> bool:
        """The deadline has passed and the broker blocks publishes: a publish would only
        wait (``PUBLISH_GRACE_S``) for nothing."""
        return (
            time.time() >= deadline
            and isinstance(self.transport, Throttled)
            and self.transport.publish_blocked
        )

    def _expired(self, target: str, requests: int, why: object) -> Outcome:
        """Requests whose publish to ``target`` failed after their deadline: dropped."""
        if self.expired_unsent % 100 == 0:
            log.warning(
                "publish to %s not confirmed before the deadline of its %d request(s) (%s); "
                "dropped as expired (%d so far)", target, requests, why,
                self.expired_unsent + requests,
            )
        self.expired_unsent += requests
        return Outcome.OK

    async def _send_reply(self, meta: RequestMeta, message: Message, deadline: float) -> Outcome:
        """Publish a reply to ``meta.reply_to``, waiting for its confirm until ``deadline``
        (``PUBLISH_GRACE_S`` at least)."""
        assert meta.reply_to is not None
        if not self.topology.is_reply_queue(meta.reply_to):
            # Intake refuses these; this guards every other path (error replies included).
            log.error(
                "not replying to %r for %s: not a reply queue of this plan (%s.reply.*)",
                meta.reply_to, meta.request_id, self.topology.base,
            )
            return Outcome.FAILED
        if self._blocked_past(deadline):
            return self._expired(meta.reply_to, 1, "the broker blocks publishes")
        try:
            await self.transport.publish(
                "", message, meta.reply_to, timeout=_confirm_bound(deadline)
            )
        except UnroutableError:
            # The client left, or its reply queue is being declared again after a broker
            # restart (the client then sends its requests again): counted, never silent.
            self.unroutable_replies += 1
            log.warning(
                "reply for request %s to %s: no such queue (client gone or reconnecting); "
                "%d unroutable replies so far",
                meta.request_id, meta.reply_to, self.unroutable_replies,
            )
        except TransportError as exc:
            if time.time() >= deadline:
                return self._expired(meta.reply_to, 1, exc)
            log.warning(
                "reply for %s failed (%s); the input will be redelivered", meta.request_id, exc
            )
            return Outcome.RETRY
        return Outcome.OK


def _deadline_of(metas: list[RequestMeta]) -> float:
    """The last of the requests' deadlines (infinite when one has none)."""
    last = float("inf") if not metas else 0.0
    for meta in metas:
        if meta.deadline is None:
            return float("inf")
        last = max(last, meta.deadline)
    return last


def _confirm_bound(deadline: float) -> float | None:
    """How long a publish for requests due at ``deadline`` waits for its confirm (None:
    the transport's own limit)."""
    if deadline == float("inf"):
        return None
    return max(deadline - time.time(), PUBLISH_GRACE_S)


async def _send_all(sends: list[Coroutine[Any, Any, None]]) -> None:
    """Concurrent like gather, but a send whose publish and settle need no wait (the
    embedded broker's) is done in place: only those that wait get a task."""
    waiting: list[asyncio.Task[None]] = []
    first_error: Exception | None = None
    for send in sends:
        try:
            task = step(send)
        except Exception as exc:  # the others still go out; raised below, as gather would
            first_error = first_error or exc
            continue
        if task is not None:
            waiting.append(task)
    if first_error is not None:
        await asyncio.gather(*waiting, return_exceptions=True)
        raise first_error
    if waiting:
        await asyncio.gather(*waiting)
