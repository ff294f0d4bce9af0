"""The controller: reads heartbeats and queue depths every period, runs a policy
(``workers.control.policies``), and applies its decisions as worker commands and binding changes.

    async with Controller(transport, plan, PolicyConfig.from_plan(plan, "dynamic")) as c:
        ...                      # c.metrics, c.workers, c.partitions, c.decisions

What it owns and how it survives restarts (docs/scheduling.md):

* Heartbeats arrive on ``<control>.controller`` (bound to ``heartbeat.*``, message TTL
  10 s, so a restarted controller finds recent heartbeats at once). Its view of the
  workers is rebuilt from them, never remembered. A heartbeat's age is judged by its own
  timestamp (``clock_skew_s`` forgiven), so a dead worker's leftovers do not look alive.
* A worker silent for three periods is dropped, and its command queue deleted if nobody
  consumes it (a crash leaves it behind; a live agent declares it again).
* The partition map (input routing key -> shard queue) is the one thing the broker cannot
  tell back; ``partition_keeper.PartitionKeeper`` retains it on the broker after every
  move and reads it back at start; the controller re-applies ("reconciles") it then,
  whenever a worker incarnation it has not seen appears, and every ``reconcile_every``
  periods.
* When it stops or dies, nothing is undone: workers keep their prefetch and consumers,
  bindings stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

from conveyor.control import Command, CommandKind, Heartbeat, decode_heartbeat, encode_command
from conveyor.errors import ConfigError, ConveyorError, TransportClosed, TransportError
from conveyor.plan import MODEL_INPUT, Plan
from conveyor.topology import Topology
from conveyor.topology_setup import stage_queues
from conveyor.transport import Consumer, Delivery, Message, QueueSpec, QueueStats, Transport
from workers.control.agent import command_queue, declare_control_exchange
from workers.control.partition_keeper import PartitionKeeper, state_queue
from workers.control.policies import (
    Decision,
    MovePartition,
    MoveWorker,
    Observation,
    PolicyConfig,
    PolicyState,
    SetPrefetch,
    decide,
    message_rows,
    stage_loads,
)

log = logging.getLogger(__name__)

__all__ = [
    "HEARTBEAT_TTL_MS",
    "Controller",
    "ControllerState",
    "LoggedDecision",
    "PendingCommand",
    "heartbeat_queue",
    "state_queue",
]


#: Heartbeats older than this are dropped by the broker. A constant (not a multiple of the
#: period): RabbitMQ refuses to re-declare a queue with other arguments.
HEARTBEAT_TTL_MS = 10_000


def heartbeat_queue(topology: Topology) -> str:
    return f"{topology.control_exchange}.controller"


@dataclass(frozen=True)
class PendingCommand:
    command: Command
    sent_at: float


@dataclass(frozen=True)
class LoggedDecision:
    at: float
    decision: Decision


class ControllerState(Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class Controller:
    def __init__(
        self,
        transport: Transport,
        plan: Plan,
        policy: PolicyConfig,
        *,
        period: float = 1.0,
        durable: bool = True,
        reconcile_every: int = 10,
        report_every: int = 10,
        clock: Callable[[], float] = time.time,
        clock_skew_s: float = 1.0,
    ) -> None:
        if period <= 0:
            raise ConfigError(f"controller period must be > 0, got {period}")
        self.transport = transport
        self.plan = plan
        self.topology = Topology.of(plan)
        self.policy = policy
        self.period = period
        self.durable = durable
        self.reconcile_every = reconcile_every
        self.report_every = report_every
        self.clock = clock
        #: How far a worker's clock may lag the controller's before its heartbeats look old.
        self.clock_skew_s = clock_skew_s
        self.state = ControllerState.NEW
        self.metrics: Counter[str] = Counter()
        #: Latest heartbeat and its arrival time per worker (live ones only after a step).
        self.workers: dict[str, Heartbeat] = {}
        self._seen_at: dict[str, float] = {}
        self._incarnations: set[tuple[str, str]] = set()
        self.pending: dict[str, PendingCommand] = {}
        self.decisions: list[LoggedDecision] = []
        self.queue_stats: dict[str, QueueStats] = {}
        self._policy_state = PolicyState()
        self._feeds = self._stage_feeds()
        self._keeper = PartitionKeeper(transport, plan, self.topology, self.metrics)
        self._steps = 0
        self._task: asyncio.Task[None] | None = None
        self._consumer: Consumer | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self.state is not ControllerState.NEW:
            raise TransportClosed(f"controller is {self.state.value}")
        topo = self.topology
        await declare_control_exchange(self.transport, topo, durable=self.durable)
        await self.transport.declare_queue(
            QueueSpec(heartbeat_queue(topo), durable=self.durable,
                      message_ttl_ms=HEARTBEAT_TTL_MS, max_length=10_000, overflow="drop-head")
        )
        await self.transport.bind_queue(heartbeat_queue(topo), topo.control_exchange, "heartbeat.*")
        await self._keeper.declare(durable=self.durable)
        await self._keeper.load(self.period)
        await self.reconcile_partitions("controller start")
        self._consumer = await self.transport.consume(
            heartbeat_queue(topo), self._on_heartbeat, prefetch=256
        )
        self.state = ControllerState.RUNNING
        self._task = asyncio.create_task(self._loop(), name="controller")
        log.info(
            "controller started: plan %s, policy %s, period %.2f s, partition map epoch %d",
            self.plan.name, self.policy.kind, self.period, self.epoch,
        )

    async def stop(self) -> None:
        """Stop deciding; every setting stays as it is (nothing is undone)."""
        if self.state is not ControllerState.RUNNING:
            self.state = ControllerState.STOPPED
            return
        self.state = ControllerState.STOPPED
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(TransportError):
                await self._consumer.cancel()
        log.info("controller stopped; metrics: %s", self.metrics_line())

    async def __aenter__(self) -> Controller:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def metrics_line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.metrics.items())) or "(none)"

    # -- inputs -----------------------------------------------------------------------------
    async def _on_heartbeat(self, delivery: Delivery) -> None:
        try:
            hb = decode_heartbeat(delivery.message.body)
        except ConveyorError as exc:
            self.metrics["heartbeats_invalid"] += 1
            log.warning("controller: dropped an unreadable heartbeat: %s", exc)
            await delivery.reject()
            return
        now = self.clock()
        # A heartbeat's age by its own timestamp: the queue keeps heartbeats for a while,
        # so a restarted controller reads those of workers that died before it started.
        age = max(0.0, now - hb.sent_at - self.clock_skew_s)
        if age > self.expiry_s(hb):
            self.metrics["heartbeats_stale"] += 1
            log.debug("controller: ignored a heartbeat of %s sent %.1f s ago", hb.worker_id,
                      now - hb.sent_at)
            await delivery.ack()
            return
        old = self.workers.get(hb.worker_id)
        if old is None or old.incarnation != hb.incarnation or hb.seq > old.seq:
            self.workers[hb.worker_id] = hb
            self._seen_at[hb.worker_id] = now - age
        self.metrics["heartbeats"] += 1
        await delivery.ack()

    def expiry_s(self, hb: Heartbeat) -> float:
        """A worker silent this long is gone (three of its periods, or of ours)."""
        return 3 * max(hb.period_s, self.period)

    def _stage_feeds(self) -> dict[str, tuple[str, ...]]:
        """Stage -> the stages whose batches its queue messages carry (a worker publishes a
        whole batch in one message; the model input reaches a later stage in the batches
        of the first stage's ingress). The first stage reads single requests."""
        first = self.plan.stages[0].name
        feeds: dict[str, tuple[str, ...]] = {}
        for spec in self.plan.stages:
            if spec.name == first:
                continue
            srcs = dict.fromkeys(first if i.source == MODEL_INPUT else i.source
                                 for i in spec.inputs)
            feeds[spec.name] = tuple(srcs)
        return feeds

    def queue_stages(self) -> dict[str, str]:
        """Every queue the plan's stages read, with the stage it feeds."""
        out = {q: s.name for s in self.plan.stages for q in stage_queues(self.plan, s)}
        for hb in self.workers.values():
            for c in hb.stats.consuming:
                out.setdefault(c.queue, c.stage)
        return out

    # -- the period -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while self.state is ControllerState.RUNNING:
            started = self.clock()
            try:
                await self.step()
            except TransportClosed:
                log.warning("controller: transport closed; stopping")
                return
            except TransportError as exc:
                self.metrics["step_errors"] += 1
                log.warning("controller: step failed, retrying next period: %s", exc)
            except Exception:  # a bug in a policy must not stop scheduling silently
                self.metrics["step_errors"] += 1
                log.exception("controller: step failed unexpectedly; retrying next period")
            await asyncio.sleep(max(0.0, self.period - (self.clock() - started)))

    async def step(self) -> list[Decision]:
        """One period: observe, decide, apply. Returns the decisions taken."""
        now = self.clock()
        for wid in self._expire_workers(now):
            await self.delete_command_queue(wid)
        self._check_acks(now)
        new = {(w, hb.incarnation) for w, hb in self.workers.items()} - self._incarnations
        self._incarnations |= new
        self._steps += 1
        if new and self._steps > 1:
            names = sorted(w for w, _ in new)
            await self.reconcile_partitions(f"new worker incarnation(s) {names}")
        elif self.reconcile_every and self._steps % self.reconcile_every == 0:
            await self.reconcile_partitions("periodic")
        queue_stage = self.queue_stages()
        stats: dict[str, QueueStats] = {}
        for q in queue_stage:
            try:
                stats[q] = await self.transport.queue_stats(q)
            except TransportClosed:
                raise
            except TransportError as exc:
                log.debug("controller: no stats for %s: %s", q, exc)
        self.queue_stats = stats
        obs = Observation(
            now=now,
            workers=dict(self.workers),
            queues=stats,
            queue_stage=queue_stage,
            input_queues=tuple(
                self.topology.input_queue(i) for i in range(self.plan.partitioning.shards)
            ),
            partitions=dict(self.partitions),
            busy_workers=frozenset(p.command.worker_id for p in self.pending.values()),
            rows_per_message=message_rows(self.workers, queue_stage, self._feeds),
        )
        decisions, self._policy_state = decide(self.policy, obs, self._policy_state)
        for d in decisions:
            await self.apply(d, now)
        self.metrics["steps"] += 1
        if self.report_every and self._steps % self.report_every == 0:
            self.report(obs)
        return decisions

    def _expire_workers(self, now: float) -> list[str]:
        """Forget the workers silent for longer than ``expiry_s``; returns them."""
        lost = []
        for wid in list(self.workers):
            hb = self.workers[wid]
            if now - self._seen_at[wid] > self.expiry_s(hb):
                log.info("controller: worker %s is gone (no heartbeat for %.1f s)",
                         wid, now - self._seen_at[wid])
                self.metrics["workers_lost"] += 1
                del self.workers[wid], self._seen_at[wid]
                lost.append(wid)
        return lost

    async def delete_command_queue(self, worker_id: str) -> bool:
        """Delete a lost worker's command queue if nobody consumes it (a crashed worker
        leaves it behind). A worker that was only cut off declares it again when it finds
        it gone (``ControlAgent.ensure_queue``). True when deleted."""
        queue = command_queue(self.topology, worker_id)
        try:
            if (await self.transport.queue_stats(queue)).consumers > 0:
                return False
            await self.transport.delete_queue(queue)
        except TransportClosed:
            raise
        except TransportError as exc:  # already gone, or the broker is unreachable now
            log.debug("controller: command queue %s not deleted: %s", queue, exc)
            return False
        self.metrics["command_queues_deleted"] += 1
        log.info("controller: deleted the command queue of lost worker %s", worker_id)
        return True

    def _check_acks(self, now: float) -> None:
        for wid, hb in self.workers.items():
            for ack in hb.acks:
                pending = self.pending.pop(ack.command_id, None)
                if pending is None:
                    continue
                if ack.ok:
                    self.metrics["commands_acked"] += 1
                else:
                    self.metrics["commands_failed"] += 1
                    log.warning("controller: %s refused command %s (%s): %s", wid, ack.command_id,
                                pending.command.kind.value, ack.detail)
        timeout = max(5 * self.period, 5.0)
        for cid, p in list(self.pending.items()):
            if now - p.sent_at > timeout:
                del self.pending[cid]
                self.metrics["commands_unacked"] += 1
                log.warning("controller: command %s to %s not acknowledged within %.1f s",
                            cid, p.command.worker_id, timeout)

    def report(self, obs: Observation) -> None:
        loads = stage_loads(obs)
        parts = [
            f"{s}: depth {ld.depth}, {len(ld.consumers)} consumers, {ld.capacity:.1f} req/s"
            for s, ld in sorted(loads.items())
        ]
        log.info("controller report (%s): %s; metrics: %s",
                 self.policy.kind, "; ".join(parts), self.metrics_line())

    # -- outputs ----------------------------------------------------------------------------
    async def apply(self, decision: Decision, now: float) -> None:
        self.decisions.append(LoggedDecision(now, decision))
        if isinstance(decision, SetPrefetch):
            log.info("controller: %s prefetch on %s %d -> %d: %s", decision.worker_id,
                     decision.queue, decision.previous, decision.prefetch, decision.reason)
            self.metrics["prefetch_changes"] += 1
            await self.send(Command(
                self._command_id(), decision.worker_id, CommandKind.SET_PREFETCH,
                stage=decision.stage, queue=decision.queue, prefetch=decision.prefetch,
                issued_at=now, reason=decision.reason,
            ))
        elif isinstance(decision, MoveWorker):
            verb = "back" if decision.returning else "moved"
            log.info("controller: %s %s %s -> %s: %s", decision.worker_id, verb,
                     list(decision.from_stages), list(decision.to_stages), decision.reason)
            self.metrics["worker_returns" if decision.returning else "worker_moves"] += 1
            for stage in decision.to_stages:  # start first: capacity never dips
                await self.send(Command(self._command_id(), decision.worker_id,
                                        CommandKind.START_CONSUMING, stage=stage, issued_at=now,
                                        reason=decision.reason))
            for stage in decision.from_stages:
                await self.send(Command(self._command_id(), decision.worker_id,
                                        CommandKind.STOP_CONSUMING, stage=stage, issued_at=now,
                                        reason=decision.reason))
        else:
            await self.move_partition(decision, now)

    async def send(self, cmd: Command) -> None:
        await self.transport.publish(
            self.topology.control_exchange,
            Message(body=encode_command(cmd), type="command", message_id=cmd.id),
            self.topology.command_key(cmd.worker_id),
            mandatory=False,
        )
        # Sent now by this controller's clock: ``issued_at`` may be unset (0.0) when a
        # caller other than the policy sends it, which timed it out at the next step.
        self.pending[cmd.id] = PendingCommand(cmd, self.clock())
        self.metrics["commands_sent"] += 1

    # -- the partition map (partition_keeper) ----------------------------------------------
    @property
    def partitions(self) -> dict[str, str]:
        """Routing key -> shard queue in force (empty for random partitioning)."""
        return self._keeper.partitions

    @property
    def epoch(self) -> int:
        """How many times the partition map was published (resumed from the retained map)."""
        return self._keeper.epoch

    async def move_partition(self, d: MovePartition, now: float) -> None:
        await self._keeper.move(d, now)

    async def publish_partition_map(self, now: float, reason: str) -> None:
        await self._keeper.publish(now, reason)

    async def reconcile_partitions(self, why: str) -> None:
        """Make the broker's input bindings match the map (idempotent)."""
        await self._keeper.reconcile(why)

    @staticmethod
    def _command_id() -> str:
        return uuid.uuid4().hex[:16]
