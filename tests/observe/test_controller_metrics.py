"""The controller's metrics: queue figures, decisions by kind and bounded reason."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.transport import QueueStats
from workers.control.controller import LoggedDecision
from workers.control.metrics import ControllerCollector, controller_registry, reason_class
from workers.control.policy_common import MoveWorker, SetPrefetch


@dataclass
class FakeController:
    decisions: list[LoggedDecision] = field(default_factory=list)
    metrics: Counter[str] = field(default_factory=Counter)
    queue_stats: dict[str, QueueStats] = field(default_factory=dict)
    workers: dict[str, object] = field(default_factory=dict)

    def queue_stages(self) -> dict[str, str]:
        return {"q.s1": "s1"}


def _samples(controller: FakeController) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = controller_registry(controller)  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text) for s in f.samples
    }


def test_decisions_count_by_kind_and_reason_and_queues_show() -> None:
    c = FakeController()
    c.queue_stats["q.s1"] = QueueStats("q.s1", depth=7, consumers=2)
    c.metrics["steps"] = 3
    for depth in (120, 340):
        c.decisions.append(LoggedDecision(0.0, SetPrefetch(
            "w1", "q.s1", "s1", 8, 4, reason=f"backlog {depth} msgs at 55.5 req/s")))
    c.decisions.append(LoggedDecision(0.0, MoveWorker("w2", ("s0",), ("s1",), False, "s1 deep")))
    samples = _samples(c)
    reason = reason_class("backlog 120 msgs at 55.5 req/s")
    assert reason == reason_class("backlog 340 msgs at 1 req/s")  # figures do not split it
    assert samples[("conveyor_controller_decisions_total",
                    (("kind", "set_prefetch"), ("reason", reason)))] == 2
    assert samples[("conveyor_controller_decisions_total",
                    (("kind", "move_worker"), ("reason", "s1 deep")))] == 1
    assert samples[("conveyor_queue_depth", (("queue", "q.s1"), ("stage", "s1")))] == 7
    assert samples[("conveyor_queue_consumers", (("queue", "q.s1"), ("stage", "s1")))] == 2
    assert samples[("conveyor_controller_events_total", (("event", "steps"),))] == 3


def test_a_second_scrape_counts_only_new_decisions() -> None:
    c = FakeController()
    collector = ControllerCollector(c)  # type: ignore[arg-type]
    c.decisions.append(LoggedDecision(0.0, MoveWorker("w", ("a",), ("b",), True, "idle")))
    list(collector.collect())
    families = {f.name: f for f in collector.collect()}
    (sample,) = families["conveyor_controller_decisions"].samples
    assert sample.value == 1 and sample.labels["kind"] == "return_worker"
