"""The async client SDK: send requests to a served plan and await the answers.

    async with conveyor.connect("amqp://...", plan="plans/mlp") as client:
        outputs = await client.infer({"x": x}, timeout=5.0)
        async for outputs in client.infer_many(batches, concurrency=16):
            ...

``Client`` works on any ``conveyor.transport.Transport`` (the way httpx's
``Client(transport=...)`` does): ``Client(plan, transport)`` uses a transport the caller
opened and closes; ``conveyor.connect`` (``conveyor.app.connect``) is the convenience that
opens one from a URL or starts the embedded broker with in-process workers.

How a request travels (docs/wire.md): one message to the plan's input exchange, body =
``wire.encode(inputs)``, properties from ``envelope.RequestMeta`` (request id, reply queue,
absolute deadline, plan hash, partition key). Every client owns one exclusive auto-delete
reply queue and one consumer on it that hands each reply to the future waiting for its
request id. With ``pack`` on (the default), the requests made in one event-loop turn
for one routing key leave as one request pack, and workers may answer several in one
reply pack (``conveyor.packs``, docs/wire.md section 7). A reply whose request is no
longer awaited (answered already, timed out or cancelled) is acknowledged and dropped:
that is how duplicates on the wire are removed.

Connection loss (docs/operations.md, "Broker restarts"): on a transport that reconnects
(``conveyor.transport.Reconnecting``, RabbitMQ's) the reply queue is declared again with
the consumer on it when the connection comes back, and every request still awaited is
published again with its id and absolute deadline unchanged: a reply lost with the old
queue is asked for again, a duplicate is dropped as above, and workers drop it unrun once
its deadline has passed. A request whose publish was under way at the loss fails with the
transport's typed error; any other ends with its answer or ``DeadlineExceeded`` by its
deadline (``DeadlineExceeded.confirmed`` says whether the broker had accepted it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
)
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from conveyor.client_checks import NoConsumerPolicy, no_consumer_message
from conveyor.client_inputs import InputCheck
from conveyor.client_packs import Outgoing, PackSender, packable, publish_through_loss
from conveyor.client_stream import in_input_order
from conveyor.eager import mark_eager
from conveyor.envelope import (
    RequestMeta,
    read_reply,
)
from conveyor.errors import (
    ConfigError,
    ConveyorError,
    DeadlineExceeded,
    NoConsumerError,
    TransportClosed,
)
from conveyor.packs import REPLY_PACK_TYPE, unpack_replies
from conveyor.plan import Plan
from conveyor.topology import Topology, partition_routing_key
from conveyor.topology_setup import declare_plan_topology
from conveyor.tracing import current_traceparent
from conveyor.transport import Message, QueueSpec, Reconnecting, Throttled
from conveyor.wire import encode

if TYPE_CHECKING:
    from conveyor.transport import Consumer, Delivery, Transport

log = logging.getLogger(__name__)

Inputs = Mapping[str, np.ndarray]
Outputs = dict[str, np.ndarray]

#: Seconds a request may take when neither ``infer`` nor ``connect`` says otherwise.
DEFAULT_TIMEOUT = 30.0
#: Waits from this long on (or not finite) go through RequestMeta's checks.
_NO_DEADLINE = 1e9
#: Why a request was not confirmed when the transport says its publishes are blocked.
BLOCKED_PUBLISHES = (
    "the broker never confirmed it: it is blocking publishes (a memory or disk alarm; "
    "`rabbitmq-diagnostics alarms` on the broker names it). Free memory or disk there, or "
    "raise its vm_memory_high_watermark / disk_free_limit, then send again; workers drop "
    "the request unrun if the broker takes it after its deadline"
)


class ClientState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class ClientStats:
    """Counters of one client (a snapshot)."""

    sent: int
    answered: int
    failed: int
    in_flight: int
    #: Replies that arrived for no awaited request: duplicates, late or abandoned ones.
    dropped_replies: int
    #: Messages published (a request pack counts once) and reply messages received.
    messages_sent: int = 0
    reply_messages: int = 0
    #: Requests published again after the connection came back (counted in ``sent`` too).
    resent: int = 0
    #: Times the transport's connection was restored.
    reconnects: int = 0


#: Opens the client's transport when it opens; registers what it opened on the stack,
#: which the client closes (last in, first out) when it closes.
Opener = Callable[[contextlib.AsyncExitStack], Awaitable["Transport"]]


class Client:
    """A connection to a served plan on a ``Transport``.

    ``Client(plan, transport)`` uses a transport that the caller opened and closes;
    ``Client(plan, opener=...)`` opens one when the client opens and closes what the
    opener put on its stack when the client closes (``conveyor.connect`` does this).
    ``on_no_consumer``: when the first request finds no worker consuming the plan's input
    queue(s), ``"warn"`` (default) logs once which command starts one, ``"fail"`` raises
    ``NoConsumerError`` (``conveyor infer``), ``"off"`` does not look.
    ``declare_topology`` (default on) declares the plan's exchanges and queues at open;
    turn it off where an admin step declared them and this client may not.
    """

    def __init__(
        self,
        plan: Plan,
        transport: Transport | None = None,
        *,
        opener: Opener | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        reply_prefetch: int = 1024,
        durable: bool = True,
        pack: bool = True,
        declare_topology: bool = True,
        on_no_consumer: NoConsumerPolicy = "warn",
    ) -> None:
        if (transport is None) == (opener is None):
            raise ConfigError("give a Client exactly one of transport= and opener=")
        if not plan.hash:
            raise ConfigError(f"plan {plan.name!r} has no hash; load it with Plan.load")
        if timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {timeout}")
        self.plan = plan
        self.topology = Topology.of(plan)
        self.default_timeout = timeout
        self.reply_queue = self.topology.reply_queue(uuid.uuid4().hex)
        # Request ids: a random per-client prefix and a counter (unique, and cheap).
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        # The envelope fields every request shares, checked once here (CodecError if not
        # valid); ``infer`` builds the meta of a request without key or trace unchecked.
        RequestMeta(self._id_prefix, reply_to=self.reply_queue, plan_hash=plan.hash)
        self._random_partitions = plan.partitioning.kind == "random"
        # Packs stack requests on the batch axis: not for inputs with a fixed batch size.
        self.pack = pack and not any(
            t.shape and isinstance(t.shape[0], int) and t.shape[0] >= 0 for t in plan.inputs
        )
        self._packs = PackSender(
            plan.hash, self.topology.input_exchange, max_requests=plan.limits.pack_requests
        )
        self._ids = itertools.count(1)
        self._inputs = InputCheck(plan)
        self._reply_prefetch = reply_prefetch
        self._durable = durable
        self._declare_topology = declare_topology
        self._on_no_consumer = on_no_consumer
        #: The first request checks that a worker consumes the input (``client_checks``).
        self._consumers_unchecked = on_no_consumer != "off"
        self._state = ClientState.NEW
        self._pending: dict[str, Outgoing] = {}
        self._given = transport
        self._opener = opener
        self._transport: Transport | None = None
        self._consumer: Consumer | None = None
        self._stack = contextlib.AsyncExitStack()
        self._sent = self._answered = self._failed = self._dropped = 0
        self._messages = self._reply_messages = 0
        self._resent = self._reconnects = 0

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def transport(self) -> Transport | None:
        """The transport requests go out on (None before ``open`` and after ``close``)."""
        return self._transport

    async def open(self) -> Client:
        if self._state is not ClientState.NEW:
            raise ConfigError(f"client is {self._state.value}; open it once")
        try:
            await self._open()
        except BaseException:
            await self._teardown()
            self._state = ClientState.CLOSED
            raise
        self._state = ClientState.OPEN
        return self

    async def _open(self) -> None:
        if self._opener is not None:
            transport = await self._opener(self._stack)
        else:
            assert self._given is not None  # __init__ checked: exactly one of the two
            transport = self._given
        self._transport = self._packs.transport = transport
        if self._declare_topology:
            await declare_plan_topology(transport, self.plan, durable=self._durable)
        await transport.declare_queue(
            QueueSpec(self.reply_queue, durable=False, auto_delete=True, exclusive=True)
        )
        self._consumer = await transport.consume(
            self.reply_queue, self._on_reply, prefetch=self._reply_prefetch
        )
        if isinstance(transport, Reconnecting):
            # The transport re-declares the reply queue and re-consumes (it was declared
            # through it); what was in flight is this client's to send again.
            transport.add_reconnect_callback(self._after_reconnect)

    async def _after_reconnect(self) -> None:
        self._reconnects += 1
        transport = self._transport
        if self._state is not ClientState.OPEN or transport is None:
            return
        if self._declare_topology:
            # What this client declared at open, again: a broker restart loses a
            # non-durable topology (idempotent otherwise).
            await declare_plan_topology(transport, self.plan, durable=self._durable)
        items = [i for i in self._pending.values() if not i.future.done()]
        if not items:
            return
        log.warning("connection to the broker restored: sending %d requests in flight again",
                    len(items))
        self._resent += len(items)
        if self.pack:
            for item in items:
                self._packs.enqueue(item.routing_key, item)
            return
        await asyncio.gather(*(self._publish_one(transport, item) for item in items))

    async def _publish_one(self, transport: Transport, item: Outgoing) -> None:
        try:
            sent = await publish_through_loss(
                transport, self.topology.input_exchange,
                item.meta.to_message(encode(item.arrays)), item.routing_key,
                awaited=lambda: not item.future.done(),
            )
        except ConveyorError as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not sent:
            return
        item.confirmed = True
        self._sent += 1
        self._messages += 1

    async def close(self) -> None:
        """Stop listening, fail what is still awaited, close what the client opened."""
        if self._state is ClientState.CLOSED:
            return
        self._state = ClientState.CLOSED
        await self._teardown()

    async def _teardown(self) -> None:
        for request_id, item in self._pending.items():
            fut = item.future
            if not fut.done():
                fut.set_exception(
                    TransportClosed(f"client closed before the reply to {request_id} arrived")
                )
                # Nobody may be awaiting it any more; do not log "never retrieved".
                fut.exception()
        self._pending.clear()
        await self._packs.close()
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await _quietly(consumer.cancel(), "cancelling the reply consumer")
        await _quietly(self._stack.aclose(), "closing what the client opened")
        self._transport = None

    async def __aenter__(self) -> Client:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- requests -----------------------------------------------------------------------
    def validate(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Check ``inputs`` against ``plan.inputs`` (names, dtype, shape) and the plan's
        size limits; ``CodecError`` (``RequestTooLarge``) if not."""
        return self._inputs.validate(inputs)

    async def infer(
        self,
        inputs: Inputs,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (becomes the request's deadline)
        key: str | None = None,
        trace_id: str | None = None,
    ) -> Outputs:
        """Send one request and return the model's outputs by name.

        ``timeout`` (seconds, default the client's) becomes the request's absolute
        deadline, carried in the message so workers drop it unrun once it has passed.
        ``key`` is the partition key (hash or range partitioning). ``trace_id`` (a W3C
        ``traceparent``, or any string) names the trace; by default the caller's
        OpenTelemetry span continues, else a new trace starts (``conveyor.tracing``). Raises
        ``DeadlineExceeded``, ``BackpressureError`` (the input queue is full),
        ``InferenceError`` (the worker's message), ``CodecError``, ``TransportError``
        (``TransportClosed`` when the client closes first). Cancelling the call abandons
        the request: a late reply is dropped.
        """
        transport = self._require_open()
        wait = self.default_timeout if timeout is None else timeout
        if wait <= 0:
            raise ConfigError(f"timeout must be positive, got {wait}")
        arrays = self.validate(inputs)
        if self._consumers_unchecked:
            await self._check_consumers(transport)
        request_id = f"{self._id_prefix}{next(self._ids):x}"
        routing_key, meta = self._meta(request_id, wait, key, trace_id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        item = Outgoing(meta, arrays, future, packable(arrays) if self.pack else -1, routing_key)
        self._pending[request_id] = item
        # A timer instead of asyncio.wait_for: one callback, no extra task per request.
        expiry = loop.call_later(wait, self._expire, item, request_id, wait)
        try:
            if self.pack:
                # Sent with the other requests of this loop turn (``PackSender``); a publish
                # failure lands on the future.
                self._packs.enqueue(routing_key, item)
            else:
                await self._send_alone(transport, item, wait)
            return await future
        except ConveyorError:
            self._failed += 1
            raise
        finally:
            expiry.cancel()
            self._pending.pop(request_id, None)

    async def _send_alone(self, transport: Transport, item: Outgoing, wait: float) -> None:
        """Publish one request as its own message, bounded by its timeout, also when the
        broker blocks publishers (a memory or disk alarm) and no confirm comes."""
        try:
            async with asyncio.timeout(wait):
                sent = await publish_through_loss(
                    transport, self.topology.input_exchange,
                    item.meta.to_message(encode(item.arrays)), item.routing_key,
                    awaited=lambda: not item.future.done(),
                )
        except TimeoutError:
            error = DeadlineExceeded(
                f"request {item.meta.request_id} could not be sent within {wait:g} s: "
                f"{self._unconfirmed_cause()}"
            )
            error.confirmed = False
            raise error from None
        if not sent:  # its deadline passed while the broker was away: the future says so
            return
        item.confirmed = True
        self._sent += 1
        self._messages += 1

    async def _check_consumers(self, transport: Transport) -> None:
        problem = await no_consumer_message(transport, self.plan)
        if problem is None:
            self._consumers_unchecked = False  # someone answers: never ask again
            return
        if self._on_no_consumer == "fail":
            raise NoConsumerError(problem)
        self._consumers_unchecked = False  # warn once
        log.warning("conveyor client: %s", problem)

    def _meta(
        self, request_id: str, wait: float, key: str | None, trace_id: str | None
    ) -> tuple[str, RequestMeta]:
        """The routing key and envelope of one request due within ``wait`` seconds."""
        now = time.time()
        deadline = now + wait
        if trace_id is None:
            trace_id = current_traceparent()
            if key is None and self._random_partitions and wait < _NO_DEADLINE:
                # The fields every request shares were checked once in __init__; the
                # traceparent and the send time are ours.
                meta = RequestMeta.trusted(
                    request_id, self.reply_queue, deadline, self.plan.hash, self.pack,
                    trace_id=trace_id, sent=now,
                )
                return "", meta
        meta = RequestMeta(
            request_id=request_id,
            reply_to=self.reply_queue,
            deadline=deadline,
            plan_hash=self.plan.hash,
            trace_id=trace_id,
            key=key,
            packed_replies=self.pack,
            sent=now,
        )
        return partition_routing_key(self.plan.partitioning, key), meta

    @overload
    def infer_many(
        self,
        inputs: Iterable[Inputs] | AsyncIterable[Inputs],
        *,
        concurrency: int = ...,
        timeout: float | None = ...,
        keys: Iterable[str | None] | None = ...,
        return_exceptions: Literal[False] = ...,
    ) -> AsyncGenerator[Outputs, None]: ...

    @overload
    def infer_many(
        self,
        inputs: Iterable[Inputs] | AsyncIterable[Inputs],
        *,
        concurrency: int = ...,
        timeout: float | None = ...,
        keys: Iterable[str | None] | None = ...,
        return_exceptions: Literal[True],
    ) -> AsyncGenerator[Outputs | ConveyorError, None]: ...

    def infer_many(
        self,
        inputs: Iterable[Inputs] | AsyncIterable[Inputs],
        *,
        concurrency: int = 16,
        timeout: float | None = None,
        keys: Iterable[str | None] | None = None,
        return_exceptions: bool = False,
    ) -> AsyncGenerator[Any, None]:
        """Send many requests, at most ``concurrency`` in flight; yield outputs IN INPUT ORDER.

        ``keys`` gives each request's partition key (zipped with ``inputs``). The first
        failed request raises (the others in flight are cancelled) unless
        ``return_exceptions`` is true, in which case its error is yielded in its place.
        Leaving the loop early cancels the requests still in flight.
        """
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        return in_input_order(self.infer, inputs, concurrency, timeout, keys, return_exceptions)

    # -- replies ------------------------------------------------------------------------
    @mark_eager  # needs no task of its own (conveyor.eager)
    async def _on_reply(self, delivery: Delivery) -> None:
        message = delivery.message
        self._reply_messages += 1
        if message.type == REPLY_PACK_TYPE:
            try:
                self._answer_pack(message)
            finally:
                await delivery.ack()
            return
        request_id = message.correlation_id or message.message_id
        item = self._pending.pop(request_id, None) if request_id else None
        future = item.future if item is not None else None
        try:
            if future is None or future.done():
                self._dropped += 1
                log.debug("dropping a reply for request %s: not awaited", request_id)
                return
            try:
                decoded = read_reply(message)
            except ConveyorError as exc:
                future.set_exception(exc)
                return
            # The decoded tensors are read-only views into the message body; hand the
            # caller arrays it owns.
            future.set_result({name: np.array(t) for name, t in decoded.tensors.items()})
            self._answered += 1
        finally:
            await delivery.ack()

    def _answer_pack(self, message: Message) -> None:
        try:
            answers = unpack_replies(message)
        except ConveyorError as exc:
            # Unreadable: its correlation id names the first request; the others time out.
            log.warning("dropping an unreadable reply pack: %s", exc)
            first = self._pending.pop(message.correlation_id or "", None)
            if first is not None and not first.future.done():
                first.future.set_exception(exc)
            return
        for request_id, tensors in answers:
            item = self._pending.pop(request_id, None)
            if item is None or item.future.done():
                self._dropped += 1
                continue
            item.future.set_result({name: np.array(t) for name, t in tensors.items()})
            self._answered += 1

    # -- introspection ------------------------------------------------------------------
    def stats(self) -> ClientStats:
        return ClientStats(
            sent=self._sent + self._packs.sent,
            answered=self._answered,
            failed=self._failed,
            in_flight=len(self._pending),
            dropped_replies=self._dropped,
            messages_sent=self._messages + self._packs.messages,
            reply_messages=self._reply_messages,
            resent=self._resent,
            reconnects=self._reconnects,
        )

    def _expire(self, item: Outgoing, request_id: str, wait: float) -> None:
        if not item.future.done():
            unsent = "" if item.confirmed else f" ({self._unconfirmed_cause()})"
            error = DeadlineExceeded(f"request {request_id} got no reply within {wait:g} s{unsent}")
            error.confirmed = item.confirmed
            item.future.set_exception(error)

    def _unconfirmed_cause(self) -> str:
        """Why the broker has not confirmed a request: blocked publishers, if it says so."""
        transport = self._transport
        if isinstance(transport, Throttled) and transport.publish_blocked:
            return BLOCKED_PUBLISHES
        return "the broker never confirmed it"

    def _require_open(self) -> Transport:
        if self._state is ClientState.CLOSED:
            raise TransportClosed("client is closed; open a new one with conveyor.connect")
        if self._state is not ClientState.OPEN or self._transport is None:
            raise ConfigError(f"client is {self._state.value}; use it inside 'async with'")
        return self._transport


async def _quietly(step: Any, what: str) -> None:
    """Run one shutdown step; a failing step is logged and the rest still run."""
    try:
        await step
    except ConveyorError as exc:
        log.warning("%s failed: %s", what, exc)
