"""Worker liveness from heartbeats: a restarted controller does not take the heartbeats a
dead worker left in its queue for a live worker (they are judged by their own timestamp),
and a worker silent for three periods is dropped."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.control import Command, CommandKind, Heartbeat, WorkerStats, encode_heartbeat
from conveyor.plan import Plan
from conveyor.transport import Message
from tests.controller.rig import Rig
from tests.support.synthetic import synthetic_plan
from workers.control.controller import Controller
from workers.control.policies import PolicyConfig


def heartbeat(worker: str, sent_at: float, seq: int = 1, period: float = 0.2) -> Heartbeat:
    return Heartbeat(worker, "inc-1", seq, sent_at, period,
                     WorkerStats(stages_available=("s",), home_stages=("s",)))


@dataclass
class StubDelivery:
    """Just enough of a ``Delivery`` for ``Controller._on_heartbeat``."""

    message: Message
    settled: str = ""

    async def ack(self) -> None:
        self.settled = "ack"

    async def reject(self) -> None:
        self.settled = "reject"


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def feed(c: Controller, hb: Heartbeat) -> None:
    d = StubDelivery(Message(encode_heartbeat(hb)))
    await c._on_heartbeat(d)  # type: ignore[arg-type]
    assert d.settled == "ack"


async def test_heartbeat_age_counts_by_its_own_timestamp() -> None:
    plan = synthetic_plan(["s"])
    clock = FakeClock(1000.0)
    c = Controller(None, plan, PolicyConfig.from_plan(plan, "dynamic"),  # type: ignore[arg-type]
                   period=1.0, clock=clock, clock_skew_s=0.5)
    # expiry: 3 periods (3 s); 0.5 s of clock skew is forgiven
    await feed(c, heartbeat("ghost", 1000.0 - 3.6, period=1.0))  # 3.1 s old: stale
    await feed(c, heartbeat("recent", 1000.0 - 2.5, period=1.0))  # 2 s old: alive for 1 s
    await feed(c, heartbeat("skewed", 1000.0 - 0.4, period=1.0))  # within the skew: now
    assert set(c.workers) == {"recent", "skewed"}
    assert c.metrics["heartbeats_stale"] == 1 and c.metrics["heartbeats"] == 2
    clock.now += 1.2
    c._expire_workers(clock.now)
    assert set(c.workers) == {"skewed"} and c.metrics["workers_lost"] == 1
    clock.now += 1.7
    c._expire_workers(clock.now)
    assert set(c.workers) == {"skewed"}
    clock.now += 0.2
    c._expire_workers(clock.now)
    assert c.workers == {} and c.metrics["workers_lost"] == 2


async def test_restarted_controller_ignores_a_dead_workers_heartbeats(
    rigs: Callable[[Plan], Rig],
) -> None:
    """The heartbeat queue keeps heartbeats for 10 s; a worker that died 5 s before the
    controller restarted is never taken for alive, one that died just now is dropped
    three periods after its last heartbeat."""
    rig = await rigs(synthetic_plan(["s"], name=f"lv{uuid.uuid4().hex[:8]}")).open()
    first = await rig.controller("dynamic", period=0.25)  # declares the heartbeat queue
    await first.stop()
    rig.controllers.remove(first)
    topo = rig.topology
    now = time.time()
    for i, (worker, sent_at) in enumerate(
        [("ghost", now - 5.0), ("ghost", now - 4.8), ("recent", now - 0.1)]
    ):
        await rig.admin.publish(
            topo.control_exchange,
            Message(encode_heartbeat(heartbeat(worker, sent_at, seq=i + 1))),
            topo.heartbeat_key(worker),
        )
    await rig.add_worker("live", {"s": 0.001}, ("s",))

    c = await rig.controller("dynamic", period=0.25)
    await rig.wait_for(lambda: "live" in c.workers and c.metrics["heartbeats_stale"] >= 2,
                       limit=10, what="the live worker and the stale heartbeats")
    assert "ghost" not in c.workers
    await rig.wait_for(lambda: c.metrics["workers_lost"] >= 1, limit=10,
                       what="the recently dead worker to be dropped")
    assert set(c.workers) == {"live"} and c.metrics["workers_lost"] == 1


class _Sink:
    """A transport that takes publishes and does nothing with them."""

    async def publish(self, *args: object, **kwargs: object) -> None:
        return None


async def test_a_command_is_timed_from_its_send_not_from_its_issued_at() -> None:
    """A command sent by another caller than the policy has no ``issued_at`` (0.0); it
    used to be taken as unanswered at the controller's next step."""
    plan = synthetic_plan(["s"])
    clock = FakeClock(1000.0)
    c = Controller(_Sink(), plan, PolicyConfig.from_plan(plan, "dynamic"),  # type: ignore[arg-type]
                   period=1.0, clock=clock)
    await c.send(Command("c-1", "w", CommandKind.STOP_CONSUMING, stage="s"))
    c._check_acks(clock.now + 0.5)
    assert "c-1" in c.pending and c.metrics["commands_unacked"] == 0
    c._check_acks(clock.now + 5.5)  # the timeout: max(5 periods, 5 s) after the send
    assert "c-1" not in c.pending and c.metrics["commands_unacked"] == 1
