"""Three workers on one stage, one 4x slower: dynamic prefetch gives it no more than its
rate's share and keeps the stage's throughput near the sum of the rates; a static prefetch
of 50 lets it hoard messages and lowers the throughput (both measured here, one after the
other, and compared)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from conveyor.plan import Plan, Scheduling, StageSchedule
from conveyor.transport import Consumer
from tests.controller.rig import Rig
from tests.support.synthetic import synthetic_plan

FAST_S, SLOW_S = 0.010, 0.040
BURST = 600


@dataclass(frozen=True)
class Run:
    throughput: float
    rate_sum: float
    slow_share: float
    slow_rate_share: float

    @property
    def efficiency(self) -> float:
        return self.throughput / self.rate_sum


async def burst(rig: Rig) -> Run:
    ids = await rig.publish(BURST)
    await rig.all_done(ids, limit=30)
    results = [rig.done[i] for i in ids]
    elapsed = max(d.at for d in results) - min(d.sent_at for d in results)
    per_worker = Counter(d.workers[0] for d in results)
    rates = {
        w: 1.0 / worker.counters["s"].service_s for w, worker in rig.workers.items()
    }
    return Run(
        throughput=BURST / elapsed,
        rate_sum=sum(rates.values()),
        slow_share=per_worker["slow"] / BURST,
        slow_rate_share=rates["slow"] / sum(rates.values()),
    )


async def test_dynamic_prefetch_follows_the_rates(rigs: Callable[[Plan], Rig]) -> None:
    plan = synthetic_plan(["s"], scheduling=Scheduling(default=StageSchedule(prefetch=50)))
    rig = await rigs(plan).open()
    for wid, service in (("fast1", FAST_S), ("fast2", FAST_S), ("slow", SLOW_S)):
        await rig.add_worker(wid, {"s": service}, ("s",), prefetch=50)

    # static: the plan's prefetch of 50 for everyone, then only reports
    static = await rig.controller("static")
    static_run = await burst(rig)
    assert static.metrics["prefetch_changes"] == 0
    await static.stop()
    rig.controllers.remove(static)

    # dynamic: the controller measures the rates (from the static burst's heartbeats) and
    # gives each consumer ceil(rate x 0.2 s)
    dynamic = await rig.controller("dynamic", horizon_s=0.2)
    await rig.wait_for(
        lambda: {w: c.prefetch for w, c in _consumers(rig).items()}["slow"] <= 10
        and min(c.prefetch for c in _consumers(rig).values()) >= 1
        and not dynamic.pending,
        limit=10, what="the dynamic prefetch to be applied",
    )
    prefetch = {w: c.prefetch for w, c in _consumers(rig).items()}
    assert prefetch["slow"] < prefetch["fast1"] and prefetch["slow"] < prefetch["fast2"]
    dynamic_run = await burst(rig)

    print(f"\n[{rig.handle.kind}] static : {static_run}  eff {static_run.efficiency:.0%}"
          f"\n[{rig.handle.kind}] dynamic: {dynamic_run}  eff {dynamic_run.efficiency:.0%}"
          f"  prefetch {prefetch}")
    # dynamic: the slow worker gets no more than its rate's share (+10 points), and the
    # stage's throughput, as a share of the sum of the three rates, beats the static run's
    # by 10 points or more. (Compared within the run: on a quiet machine dynamic reaches
    # ~95% and static ~65%; with the CPU shared both fall, e.g. 81% and 66% in a CI run,
    # where an absolute 90% bar failed.)
    assert dynamic_run.slow_share <= dynamic_run.slow_rate_share + 0.10
    assert dynamic_run.efficiency >= static_run.efficiency + 0.10, (static_run, dynamic_run)
    # static prefetch 50: the slow worker hoards, the fast ones idle at the end
    assert static_run.slow_share > dynamic_run.slow_share
    assert static_run.efficiency < 0.90
    assert static_run.throughput < dynamic_run.throughput
    assert dynamic.metrics["prefetch_changes"] >= 3
    assert rig.duplicates == 0


def _consumers(rig: Rig) -> dict[str, Consumer]:
    """Each worker's one consumer (the transport's own record of its prefetch)."""
    out = {}
    for wid, w in rig.workers.items():
        (consumer,) = [c for _, c in w.consumers.values()]
        out[wid] = consumer
    return out
