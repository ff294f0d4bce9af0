"""Prometheus metrics of the controller (docs/operations.md, "Metrics"), read at scrape.

* ``conveyor_queue_depth{stage,queue}`` and ``conveyor_queue_consumers{stage,queue}``: what
  the controller last read of every queue of the plan;
* ``conveyor_controller_decisions_total{kind,reason}``: its decisions (``set_prefetch``,
  ``move_worker``, ``return_worker``, ``move_partition``) by reason, the reason's figures
  replaced by ``N`` so that the label keeps a bounded set of values;
* ``conveyor_controller_events_total{event}``: its own counters (steps, commands sent,
  heartbeats, expired workers, ...);
* ``conveyor_controller_workers``: workers whose heartbeats are current.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from workers.control.policy_common import Decision, MovePartition, MoveWorker, SetPrefetch

if TYPE_CHECKING:
    from workers.control.controller import Controller

#: Figures (not digits inside names such as stage ``s1`` or worker ids).
_FIGURES = re.compile(r"(?<![\w.-])[-+]?\d[\d.,]*(?:e[-+]?\d+)?")
#: Longest reason label kept.
MAX_REASON = 80


def reason_class(reason: str) -> str:
    """A decision's reason with its figures replaced (a bounded label value)."""
    return _FIGURES.sub("N", reason)[:MAX_REASON]


def decision_kind(decision: Decision) -> str:
    if isinstance(decision, SetPrefetch):
        return "set_prefetch"
    if isinstance(decision, MoveWorker):
        return "return_worker" if decision.returning else "move_worker"
    assert isinstance(decision, MovePartition)
    return "move_partition"


class ControllerCollector:
    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._counted = 0
        self._decisions: Counter[tuple[str, str]] = Counter()

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self.controller
        for logged in c.decisions[self._counted:]:
            d = logged.decision
            self._decisions[(decision_kind(d), reason_class(d.reason))] += 1
        self._counted = len(c.decisions)
        decisions = CounterMetricFamily(
            "conveyor_controller_decisions", "Decisions the controller made, by kind and reason",
            labels=["kind", "reason"],
        )
        for (kind, reason), n in sorted(self._decisions.items()):
            decisions.add_metric([kind, reason], n)
        events = CounterMetricFamily(
            "conveyor_controller_events", "The controller's own counters", labels=["event"]
        )
        for event, n in sorted(c.metrics.items()):
            events.add_metric([event], n)
        depth = GaugeMetricFamily(
            "conveyor_queue_depth", "Messages ready in a stage's queue", labels=["stage", "queue"]
        )
        consumers = GaugeMetricFamily(
            "conveyor_queue_consumers", "Consumers of a stage's queue", labels=["stage", "queue"]
        )
        stages = c.queue_stages()
        for queue, stats in sorted(c.queue_stats.items()):
            stage = stages.get(queue, "")
            depth.add_metric([stage, queue], stats.depth)
            consumers.add_metric([stage, queue], stats.consumers)
        workers = GaugeMetricFamily(
            "conveyor_controller_workers", "Workers whose heartbeats are current"
        )
        workers.add_metric([], len(c.workers))
        yield from (decisions, events, depth, consumers, workers)


def controller_registry(controller: Controller) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(controller))  # type: ignore[arg-type]
    return registry
