"""Prometheus metrics of a stage worker (docs/operations.md, "Metrics", lists them all).

The hot path only adds to plain numbers: ``StageTimings`` holds lock-free histograms
(``Histogram.observe`` appends to a buffer, binned at read time) and outcome counts beside the
``StageCounters`` a runner already keeps. Nothing is formatted until a scrape:
``WorkerCollector`` reads those numbers and yields the metric families then. Each worker
has a registry of its own (``WorkerMetrics.registry``), so several workers in one process
(tests, ``conveyor run`` with in-process clients) never share or clash; every series is
labelled with the worker id as well.

Figures of the ingress (decoding and batching requests on the input shards) are reported
as the first stage's, as the control plane does (``workers.stats.control_snapshot``).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from conveyor import __version__
from conveyor.plan import MODEL_INPUT

if TYPE_CHECKING:
    from workers.stats import StageCounters

#: Bucket bounds (seconds) of every duration histogram: 100 us to 10 s.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)
#: Bucket bounds of the batch-size histogram (requests per batch).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: A runner's histograms are folded every this many batches (``StageTimings.tick``): a
#: buffer then holds at most a few thousand values per batch size of the stage.
FOLD_EVERY = 1024


class Histogram:
    """Counts per bucket, sum and count of values that one event loop observes.

    The hot path only appends: ``observe`` *is* ``array.append`` of a buffer of doubles
    (no Python frame, no float object kept: 48 ns a call against 139 for a bisect and three
    additions, ``timeit`` on the dev machine), ``observe_all`` its ``extend``, and
    ``observe_n`` (a value that counts ``times`` times: a batch's requests that waited
    alike) appends to a weighted pair.
    ``fold`` bins the buffers with numpy (a few ns a value) into the counts, a negative
    value as 0 (a duration measured against another host's clock that runs ahead); every read
    (``counts``, ``total``, ``count``, ``buckets``) folds first, and ``StageTimings.tick``
    folds every ``FOLD_EVERY`` batches so memory stays bounded when nobody scrapes. One
    event loop writes and reads it (a scrape is served in the worker's loop).
    """

    __slots__ = ("_count", "_counts", "_edges", "_times", "_total", "_values", "_weighted",
                 "bounds", "observe", "observe_all")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._edges = np.asarray(self.bounds, dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)
        self._total = 0.0
        self._count = 0
        self._values: array[float] = array("d")
        self._weighted: array[float] = array("d")
        self._times: array[int] = array("q")
        self._bind()

    def _bind(self) -> None:
        #: Add one value.
        self.observe: Callable[[float], None] = self._values.append
        #: Add each of a list of values (one batch's requests).
        self.observe_all: Callable[[Iterable[float]], None] = self._values.extend

    def observe_n(self, value: float, times: int) -> None:
        """Add ``value`` ``times`` times."""
        self._weighted.append(value)
        self._times.append(times)

    def fold(self) -> None:
        """Bin what was observed since the last fold into the counts."""
        if not (self._values or self._weighted):
            return
        values, weighted, times = self._values, self._weighted, self._times
        self._values, self._weighted, self._times = array("d"), array("d"), array("q")
        self._bind()
        if values:
            v = np.maximum(np.frombuffer(values, dtype=np.float64), 0.0)
            self._counts += np.bincount(self._bin(v), minlength=len(self._counts))
            self._total += float(v.sum())
            self._count += len(v)
        if weighted:
            v = np.maximum(np.frombuffer(weighted, dtype=np.float64), 0.0)
            n = np.frombuffer(times, dtype=np.int64)
            self._counts += np.bincount(self._bin(v), weights=n,
                                        minlength=len(self._counts)).astype(np.int64)
            self._total += float(v @ n)
            self._count += int(n.sum())

    def _bin(self, values: np.ndarray) -> np.ndarray:
        # Bucket i holds values <= bounds[i] (Prometheus' "le"), as bisect_left places them.
        return np.searchsorted(self._edges, values, side="left")

    @property
    def counts(self) -> list[int]:
        """Values per bucket (not cumulative), the last one above every bound."""
        self.fold()
        return [int(c) for c in self._counts]

    @property
    def total(self) -> float:
        self.fold()
        return self._total

    @property
    def count(self) -> int:
        self.fold()
        return self._count

    def add(self, other: Histogram) -> None:
        """Add ``other``'s observations (same bounds) to this one's."""
        other.fold()
        self.fold()
        self._counts += other._counts
        self._total += other._total
        self._count += other._count

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, ending with ``+Inf``, as Prometheus wants them."""
        counts = self.counts
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, counts, strict=False):
            running += n
            out.append((_le(bound), running))
        out.append(("+Inf", self._count))
        return out


def _le(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


@dataclass
class StageTimings:
    """What one runner (stage or ingress) measures beside its ``StageCounters``."""

    #: In the broker: from the upstream publish (or the client's send) to this worker.
    queue_wait: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    #: In this worker before the session runs it: batching and the wait for the session.
    batch_wait: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    #: The session's run, per batch.
    compute: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    #: One publish of the outputs, until the broker confirmed it.
    publish: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    #: From the client's send to the reply's publish (stages that reply).
    end_to_end: Histogram = field(default_factory=lambda: Histogram(SECONDS_BUCKETS))
    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    #: Requests that ended here with an error, by error code.
    failures: dict[str, int] = field(default_factory=dict)
    #: Requests run alone (a failed batch split up) that succeeded.
    isolated_ok: int = 0
    #: Deliveries received again (``redelivered``) and deliveries dead-lettered.
    redelivered: int = 0
    dead_lettered: int = 0
    #: Off (``WorkerSettings.metrics=False``): the durations and batch sizes are not
    #: measured (the benchmark's "metrics off" leg); counts still are.
    enabled: bool = True
    #: Batches since the histograms were last folded.
    _batches: int = 0

    def histograms(self) -> tuple[tuple[str, Histogram], ...]:
        """Each histogram with its key in ``HISTOGRAMS``."""
        return (
            ("queue_wait", self.queue_wait), ("batch_wait", self.batch_wait),
            ("compute", self.compute), ("publish", self.publish),
            ("end_to_end", self.end_to_end), ("batch_size", self.batch_size),
        )

    def tick(self) -> None:
        """Once per batch: fold the histograms every ``FOLD_EVERY`` batches."""
        self._batches += 1
        if self._batches >= FOLD_EVERY:
            self._batches = 0
            for _, h in self.histograms():
                h.fold()

    def failed(self, code: str, requests: int = 1) -> None:
        self.failures[code] = self.failures.get(code, 0) + requests


class RunnerView(Protocol):
    """What the collector reads of a runner (``workers.runner.StageRunner``)."""

    @property
    def counters(self) -> StageCounters: ...
    @property
    def timings(self) -> StageTimings: ...


@dataclass(frozen=True)
class QueueView:
    queue: str
    stage: str
    prefetch: int
    consuming: bool


@dataclass(frozen=True)
class OutboxView:
    """A worker's sends that went nowhere (``workers.outbox.Outbox``)."""

    #: Replies the broker could not route (the caller's reply queue was gone).
    unroutable_replies: int
    #: Requests dropped unsent: their deadline passed while the publish waited (a broker
    #: alarm blocking publishers, or a full next stage).
    expired_unsent: int


class WorkerView(Protocol):
    """What the collector reads of a worker (``workers.stage_worker.StageWorker``)."""

    @property
    def worker_id(self) -> str: ...
    def metric_runners(self) -> Mapping[str, RunnerView]: ...
    def metric_queues(self) -> Iterable[QueueView]: ...
    def metric_outbox(self) -> OutboxView: ...
    @property
    def plan_hash(self) -> str: ...
    @property
    def first_stage(self) -> str: ...


def _stage_of(name: str, first: str) -> str:
    return first if name == MODEL_INPUT else name


class WorkerCollector:
    """Builds a worker's metric families at scrape time (a prometheus_client collector)."""

    def __init__(self, worker: WorkerView) -> None:
        self.worker = worker

    def describe(self) -> list[Metric]:
        # No scrape at registration (the runners do not exist yet).
        return []

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        wid, first = w.worker_id, w.first_stage
        figures = _StageFigures(wid, w.plan_hash)
        for name, runner in w.metric_runners().items():
            figures.add(name, _stage_of(name, first), runner)
        yield from figures.families()
        yield from _histograms(wid, figures.hists)
        yield _prefetch(wid, w.metric_queues())
        yield from _outbox(wid, w.metric_outbox())


class _StageFigures:
    """One scrape's figures of a worker's runners, summed per stage (the ingress's runners
    count as the first stage's; only the stages' own runners count requests done)."""

    def __init__(self, wid: str, plan_hash: str) -> None:
        self.wid, self.plan_hash = wid, plan_hash
        self.batches = CounterMetricFamily(
            "conveyor_batches", "Batches a stage's session ran", labels=["worker", "stage"]
        )
        self.info = InfoMetricFamily(
            "conveyor_worker", "What a worker serves",
            labels=["worker", "stage", "plan", "provider", "version"],
        )
        self.ok: dict[str, int] = {}
        self.fails: dict[tuple[str, str], int] = {}
        self.flights: dict[str, int] = {}
        self.redeliveries: dict[str, int] = {}
        self.deads: dict[str, int] = {}
        self.hists: dict[str, dict[str, list[Histogram]]] = {}

    def add(self, name: str, stage: str, runner: RunnerView) -> None:
        wid = self.wid
        c, t = runner.counters, runner.timings
        if name != MODEL_INPUT:
            self.ok[stage] = self.ok.get(stage, 0) + c.requests + t.isolated_ok
            self.batches.add_metric([wid, stage], c.batches)
            self.info.add_metric(
                [wid, stage, self.plan_hash, c.provider, __version__], {}
            )
        for code, n in t.failures.items():
            self.fails[(stage, code)] = self.fails.get((stage, code), 0) + n
        self.flights[stage] = self.flights.get(stage, 0) + c.in_flight
        self.redeliveries[stage] = self.redeliveries.get(stage, 0) + t.redelivered
        self.deads[stage] = self.deads.get(stage, 0) + t.dead_lettered
        per = self.hists.setdefault(stage, {})
        for metric, hist in t.histograms():
            per.setdefault(metric, []).append(hist)

    def families(self) -> Iterator[Metric]:
        """The counter, gauge and info families, in the order they are exposed."""
        wid = self.wid
        requests = CounterMetricFamily(
            "conveyor_requests", "Requests a stage finished, by outcome (ok or the error code)",
            labels=["worker", "stage", "outcome"],
        )
        in_flight = GaugeMetricFamily(
            "conveyor_in_flight", "Requests accepted by a stage and not handed on yet",
            labels=["worker", "stage"],
        )
        redelivered = CounterMetricFamily(
            "conveyor_redelivered", "Deliveries that arrived flagged redelivered",
            labels=["worker", "stage"],
        )
        dead = CounterMetricFamily(
            "conveyor_dead_lettered", "Deliveries rejected to the dead-letter queue",
            labels=["worker", "stage"],
        )
        for stage, n in self.ok.items():
            requests.add_metric([wid, stage, "ok"], n)
        for (stage, code), n in self.fails.items():
            requests.add_metric([wid, stage, code], n)
        for stage, n in self.flights.items():
            in_flight.add_metric([wid, stage], n)
        for stage, n in self.redeliveries.items():
            redelivered.add_metric([wid, stage], n)
        for stage, n in self.deads.items():
            dead.add_metric([wid, stage], n)
        yield from (requests, in_flight, redelivered, dead, self.batches, self.info)


#: (metric key, name, help) of the histograms, in the order they are exposed.
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("queue_wait", "conveyor_queue_wait_seconds",
     "Time a request waited in the broker before this stage's worker got it"),
    ("batch_wait", "conveyor_batch_wait_seconds",
     "Time a request waited in the worker (batching, the session busy) before it ran"),
    ("compute", "conveyor_compute_seconds", "Session run time per batch"),
    ("publish", "conveyor_publish_seconds",
     "Time to publish a stage's outputs (or replies) until the broker confirmed them"),
    ("end_to_end", "conveyor_request_duration_seconds",
     "From the client's send to the reply's publish, at the stage that replies"),
    ("batch_size", "conveyor_batch_size", "Requests per batch a stage ran"),
)


def _histograms(wid: str, hists: Mapping[str, Mapping[str, list[Histogram]]]) -> Iterator[Metric]:
    for key, name, doc in HISTOGRAMS:
        family = HistogramMetricFamily(name, doc, labels=["worker", "stage"])
        for stage, per in hists.items():
            parts = [h for h in per.get(key, []) if h.count]
            if not parts:
                continue
            merged = Histogram(parts[0].bounds)
            for h in parts:
                merged.add(h)
            family.add_metric([wid, stage], merged.buckets(), merged.total)
        yield family


def _outbox(wid: str, outbox: OutboxView) -> Iterator[Metric]:
    unroutable = CounterMetricFamily(
        "conveyor_unroutable_replies", "Replies the broker could not route (caller gone)",
        labels=["worker"])
    unroutable.add_metric([wid], outbox.unroutable_replies)
    expired = CounterMetricFamily(
        "conveyor_expired_unsent", "Requests dropped unsent: their deadline passed while "
        "the publish waited (broker alarm, full next stage)", labels=["worker"])
    expired.add_metric([wid], outbox.expired_unsent)
    yield from (unroutable, expired)


def _prefetch(wid: str, queues: Iterable[QueueView]) -> Metric:
    family = GaugeMetricFamily(
        "conveyor_prefetch", "Prefetch limit of a queue this worker consumes (0: not consuming)",
        labels=["worker", "stage", "queue"],
    )
    for q in queues:
        family.add_metric([wid, q.stage, q.queue], q.prefetch if q.consuming else 0)
    return family


class WorkerMetrics:
    """A worker's registry holding its collector; ``conveyor.app.observe`` serves it."""

    def __init__(self, worker: WorkerView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(WorkerCollector(worker))  # type: ignore[arg-type]
