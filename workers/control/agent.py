"""The worker's side of the control plane: heartbeats out, commands in.

    async with ControlAgent(transport, topology, worker, "w-1", period=1.0):
        ...   # the worker runs; the agent reports and obeys

Every ``period`` seconds the agent publishes ``worker.snapshot()`` as a ``Heartbeat`` on the
control exchange (routing key ``heartbeat.<worker_id>``; not mandatory: with no controller
listening the heartbeat is simply dropped). It consumes its own command queue
``<base>.control.cmd.<worker_id>``, bound to ``command.<worker_id>``, applies each command
through the ``Controllable`` one at a time, and reports the result in the heartbeat it
sends right after (and in the next ones: a window of the last ``ACK_WINDOW`` results). A
command redelivered after a reconnect is recognised by its id and not applied twice.

The command queue is not exclusive so that it survives a reconnect of the worker's
connection; it has a message TTL so that orders for a worker that is gone expire, and the
agent deletes it when it stops in order. A worker that crashes leaves it behind: the
controller deletes the command queue of a worker it declares lost once the queue has no
consumer. Should that happen to a worker that was only cut off for a while (or should
anyone delete the queue), the agent notices within ``queue_check_every`` periods and
declares, binds and consumes it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from enum import Enum
from types import TracebackType

from conveyor.control import (
    Command,
    CommandKind,
    CommandResult,
    Controllable,
    Heartbeat,
    decode_command,
    encode_heartbeat,
)
from conveyor.errors import (
    ChannelBroken,
    ConfigError,
    ConveyorError,
    TransportClosed,
    TransportError,
)
from conveyor.topology import Topology
from conveyor.transport import (
    Consumer,
    Delivery,
    ExchangeSpec,
    ExchangeType,
    Message,
    QueueSpec,
    Transport,
)

log = logging.getLogger(__name__)

#: How many command results every heartbeat repeats.
ACK_WINDOW = 64
#: Commands older than this are dropped by the broker (a worker that is gone).
COMMAND_TTL_MS = 60_000
#: Every this many heartbeats the agent checks that its command queue still exists.
QUEUE_CHECK_EVERY = 5


def command_queue(topology: Topology, worker_id: str) -> str:
    return f"{topology.control_exchange}.cmd.{worker_id}"


async def declare_control_exchange(
    transport: Transport, topology: Topology, *, durable: bool = True
) -> None:
    """The control exchange, declared as ``conveyor.topology_setup`` declares it."""
    await transport.declare_exchange(
        ExchangeSpec(topology.control_exchange, ExchangeType.TOPIC, durable=durable)
    )


class AgentState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class ControlAgent:
    def __init__(
        self,
        transport: Transport,
        topology: Topology,
        worker: Controllable,
        worker_id: str,
        period: float = 1.0,
        *,
        durable: bool = True,
        queue_check_every: int = QUEUE_CHECK_EVERY,
    ) -> None:
        if period <= 0:
            raise ConfigError(f"heartbeat period must be > 0, got {period}")
        if queue_check_every < 1:
            raise ConfigError(f"queue_check_every must be at least 1, got {queue_check_every}")
        self.transport = transport
        self.topology = topology
        self.worker = worker
        self.worker_id = worker_id
        self.period = period
        self.durable = durable
        self.incarnation = uuid.uuid4().hex[:12]
        self.state = AgentState.NEW
        self.heartbeats_sent = 0
        self.queue_check_every = queue_check_every
        #: Times the command queue was found gone and made again.
        self.queue_recreated = 0
        self._seq = 0
        self._results: deque[CommandResult] = deque(maxlen=ACK_WINDOW)
        self._applied: set[str] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: Consumer | None = None

    @property
    def queue(self) -> str:
        return command_queue(self.topology, self.worker_id)

    @property
    def results(self) -> tuple[CommandResult, ...]:
        return tuple(self._results)

    async def start(self) -> None:
        if self.state is not AgentState.NEW:
            raise TransportClosed(f"control agent of {self.worker_id} is {self.state.value}")
        await declare_control_exchange(self.transport, self.topology, durable=self.durable)
        await self._open_queue()
        self.state = AgentState.RUNNING
        self._task = asyncio.create_task(self._beat(), name=f"heartbeat-{self.worker_id}")

    async def _open_queue(self) -> None:
        await self.transport.declare_queue(
            QueueSpec(self.queue, durable=self.durable, message_ttl_ms=COMMAND_TTL_MS)
        )
        await self.transport.bind_queue(
            self.queue, self.topology.control_exchange, self.topology.command_key(self.worker_id)
        )
        self._consumer = await self.transport.consume(self.queue, self._on_command, prefetch=16)

    async def ensure_queue(self) -> bool:
        """Make the command queue and its consumer again if the queue is gone (deleted by
        a controller that took this worker for lost while its connection was down, or by
        hand). True when it had to. A connection that is down is left to reconnect."""
        try:
            await self.transport.queue_stats(self.queue)
            return False
        except (TransportClosed, ChannelBroken):
            return False
        except TransportError as exc:
            log.warning("control agent %s: command queue %s is gone (%s); declaring it again",
                        self.worker_id, self.queue, exc)
        old, self._consumer = self._consumer, None
        if old is not None:
            with contextlib.suppress(TransportError):
                await old.cancel()
        await self._open_queue()
        self.queue_recreated += 1
        return True

    async def stop(self, *, delete_queue: bool = True) -> None:
        """Stop heartbeats and commands; the worker keeps its last settings."""
        if self.state is not AgentState.RUNNING:
            self.state = AgentState.STOPPED
            return
        self.state = AgentState.STOPPED
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(TransportError):
                await self._consumer.cancel()
        if delete_queue:
            with contextlib.suppress(TransportError):
                await self.transport.delete_queue(self.queue)

    async def __aenter__(self) -> ControlAgent:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- heartbeats -------------------------------------------------------------------------
    def heartbeat(self) -> Heartbeat:
        self._seq += 1
        return Heartbeat(
            worker_id=self.worker_id,
            incarnation=self.incarnation,
            seq=self._seq,
            sent_at=time.time(),
            period_s=self.period,
            stats=self.worker.snapshot(),
            acks=tuple(self._results),
        )

    async def send_heartbeat(self) -> None:
        body = encode_heartbeat(self.heartbeat())
        await self.transport.publish(
            self.topology.control_exchange,
            Message(body=body, type="heartbeat"),
            self.topology.heartbeat_key(self.worker_id),
            mandatory=False,
        )
        self.heartbeats_sent += 1

    async def _beat(self) -> None:
        while self.state is AgentState.RUNNING:
            try:
                await self.send_heartbeat()
                if self.heartbeats_sent % self.queue_check_every == 0:
                    await self.ensure_queue()
            except TransportClosed:
                log.info("control agent %s: transport closed, heartbeats stop", self.worker_id)
                return
            except TransportError as exc:
                log.warning("control agent %s: heartbeat not sent: %s", self.worker_id, exc)
            except Exception:  # a snapshot bug must not stop the heartbeats silently
                log.exception("control agent %s: heartbeat failed", self.worker_id)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.period)

    # -- commands ---------------------------------------------------------------------------
    async def _on_command(self, delivery: Delivery) -> None:
        try:
            cmd = decode_command(delivery.message.body)
        except ConveyorError as exc:
            log.warning("control agent %s: dropped an unreadable command: %s", self.worker_id, exc)
            await delivery.reject()
            return
        if cmd.worker_id != self.worker_id:
            log.warning(
                "control agent %s: dropped command %s addressed to %s",
                self.worker_id, cmd.id, cmd.worker_id,
            )
            await delivery.reject()
            return
        async with self._lock:
            if cmd.id not in self._applied:
                self._results.append(await self.apply(cmd))
                self._applied.add(cmd.id)
                if len(self._applied) > 4 * ACK_WINDOW:
                    self._applied = {r.command_id for r in self._results}
        await delivery.ack()
        self._wake.set()  # acknowledge in a heartbeat now, not a period later

    async def apply(self, cmd: Command) -> CommandResult:
        """Apply one command through the worker; failures are reported, not raised."""
        try:
            if cmd.kind is CommandKind.SET_PREFETCH:
                assert cmd.queue is not None and cmd.prefetch is not None  # checked by Command
                await self.worker.set_prefetch(cmd.queue, cmd.prefetch)
            elif cmd.kind is CommandKind.START_CONSUMING:
                assert cmd.stage is not None
                await self.worker.start_consuming(cmd.stage, cmd.queue)
            else:
                assert cmd.stage is not None
                await self.worker.stop_consuming(cmd.stage, cmd.queue)
        except ConveyorError as exc:
            log.warning(
                "control agent %s: command %s %s failed: %s",
                self.worker_id, cmd.id, cmd.kind.value, exc,
            )
            return CommandResult(cmd.id, False, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a worker bug: report it, keep obeying later commands
            log.exception("control agent %s: command %s %s raised", self.worker_id, cmd.id,
                          cmd.kind.value)
            return CommandResult(cmd.id, False, f"unexpected {type(exc).__name__}: {exc}")
        log.info(
            "control agent %s: applied %s %s (stage=%s queue=%s prefetch=%s): %s",
            self.worker_id, cmd.id, cmd.kind.value, cmd.stage, cmd.queue, cmd.prefetch, cmd.reason,
        )
        return CommandResult(cmd.id, True)
