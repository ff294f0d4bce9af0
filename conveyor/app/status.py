"""What ``conveyor status`` measures: per stage, two samples a moment apart, compared.

A sample (``StageSample`` per stage) comes from the broker (queue depth and consumers of
the stage's queues, ``Transport.queue_stats``) and from metrics endpoints (``/metrics`` of
workers or of a ``conveyor run`` process: requests by outcome, dead letters, in flight,
the compute and batch-size histograms; a ``conveyor run`` process also exports its
embedded broker's ``conveyor_queue_depth`` and ``conveyor_queue_consumers``). Two samples
``seconds`` apart give the rates *now* (``StageStatus``): completions per second, arrivals
per second (completions plus what the stage's backlog grew by), p50 / p99 service time
(compute per batch, from the histogram's new observations) and the mean batch. The
bottleneck is the stage with the largest backlog growing or held, else the slowest
service; a stage no consumer reads is shown as such.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from conveyor.plan import Plan
from conveyor.topology_setup import stage_queues

#: The samples of one scrape: (name, labels) -> value.
Samples = Mapping[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class StageSample:
    depth: int | None = None
    consumers: int | None = None
    ok: float = 0.0
    errors: float = 0.0
    dead: float = 0.0
    in_flight: float = 0.0
    batches: float = 0.0
    batch_requests: float = 0.0
    #: Cumulative compute-seconds histogram: upper bound -> count.
    compute: dict[float, float] = field(default_factory=dict)
    #: Messages waiting in the stage's suspect queues (their worker died; run one at a
    #: time, ``workers.redelivery``): from the broker, None when not asked.
    suspects: int | None = None


@dataclass(frozen=True)
class StageStatus:
    stage: str
    depth: int | None
    consumers: int | None
    arrival_rps: float
    completion_rps: float
    p50_s: float | None
    p99_s: float | None
    mean_batch: float | None
    errors: float
    dead: float
    bottleneck: bool = False
    suspects: int | None = None

    @property
    def unserved(self) -> bool:
        return self.consumers == 0


def sample_from_metrics(plan: Plan, scrapes: Iterable[Samples]) -> dict[str, StageSample]:
    """Per stage, the sums over every scraped process (workers of one plan)."""
    out = {name: StageSample() for name in plan.stage_names}
    queue_stage = _queue_stages(plan)
    for samples in scrapes:
        for (name, labels), value in samples.items():
            lab = dict(labels)
            if name in ("conveyor_queue_depth", "conveyor_queue_consumers"):
                stage = queue_stage.get(lab.get("queue", ""))
                if stage is None:
                    continue
                s = out[stage]
                if name == "conveyor_queue_depth":
                    s.depth = int((s.depth or 0) + value)
                else:
                    s.consumers = int((s.consumers or 0) + value)
                continue
            st = out.get(lab.get("stage", ""))
            if st is None or lab.get("plan", plan.hash) != plan.hash:
                continue
            _add(st, name, lab, value)
    return out


def _add(s: StageSample, name: str, lab: Mapping[str, str], value: float) -> None:
    if name == "conveyor_requests_total":
        if lab.get("outcome") == "ok":
            s.ok += value
        else:
            s.errors += value
    elif name == "conveyor_dead_lettered_total":
        s.dead += value
    elif name == "conveyor_in_flight":
        s.in_flight += value
    elif name == "conveyor_batch_size_count":
        s.batches += value
    elif name == "conveyor_batch_size_sum":
        s.batch_requests += value
    elif name == "conveyor_compute_seconds_bucket":
        bound = float(lab["le"])
        s.compute[bound] = s.compute.get(bound, 0.0) + value


def _queue_stages(plan: Plan) -> dict[str, str]:
    return {q: spec.name for spec in plan.stages for q in stage_queues(plan, spec)}


def merge_broker(
    plan: Plan, samples: dict[str, StageSample], broker: Mapping[str, tuple[int, int]]
) -> None:
    """Depth and consumers per stage from the broker's (depth, consumers) per queue; they
    replace what metrics said (the broker is the truth about its queues)."""
    queue_stage = _queue_stages(plan)
    for name in {queue_stage[q] for q in broker if q in queue_stage}:
        samples[name].depth = samples[name].consumers = 0
    for queue, (depth, consumers) in broker.items():
        stage = queue_stage.get(queue)
        if stage is not None:
            s = samples[stage]
            s.depth = (s.depth or 0) + depth
            s.consumers = (s.consumers or 0) + consumers


def compare(
    plan: Plan, before: Mapping[str, StageSample], after: Mapping[str, StageSample], seconds: float
) -> list[StageStatus]:
    """The status of each stage between two samples ``seconds`` apart."""
    rows: list[StageStatus] = []
    for name in plan.stage_names:
        a, b = before[name], after[name]
        done = (b.ok - a.ok) + (b.errors - a.errors)
        backlog_a = (a.depth or 0) + a.in_flight
        backlog_b = (b.depth or 0) + b.in_flight
        batches = b.batches - a.batches
        rows.append(
            StageStatus(
                stage=name,
                depth=b.depth,
                consumers=b.consumers,
                arrival_rps=max(0.0, done + backlog_b - backlog_a) / seconds,
                completion_rps=max(0.0, b.ok - a.ok) / seconds,
                p50_s=quantile(_delta(a.compute, b.compute), 0.5),
                p99_s=quantile(_delta(a.compute, b.compute), 0.99),
                mean_batch=(b.batch_requests - a.batch_requests) / batches if batches else None,
                errors=b.errors,
                dead=b.dead,
                suspects=b.suspects,
            )
        )
    return mark_bottleneck(rows)


def _delta(a: Mapping[float, float], b: Mapping[float, float]) -> dict[float, float]:
    new = {le: b[le] - a.get(le, 0.0) for le in b}
    # Nothing ran in between: describe the service time seen so far.
    return new if new.get(math.inf, 0.0) > 0 else dict(b)


def quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram (linear in its bucket, as PromQL's
    ``histogram_quantile``); None when it holds nothing."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            span = count - below
            return lower + (bound - lower) * ((rank - below) / span if span else 1.0)
        lower, below = bound, count
    return lower


def mark_bottleneck(rows: Sequence[StageStatus]) -> list[StageStatus]:
    """Mark the stage holding the work back: the deepest queue (a stage without consumers
    that has work counts first), else the slowest service time."""
    def backlog(r: StageStatus) -> tuple[int, float]:
        return (1 if r.unserved and (r.depth or 0) > 0 else 0, float(r.depth or 0))

    candidates = [r for r in rows if backlog(r) > (0, 0.0)]
    chosen: StageStatus | None = None
    if candidates:
        chosen = max(candidates, key=backlog)
    else:
        timed = [r for r in rows if r.p50_s is not None]
        if timed:
            chosen = max(timed, key=lambda r: r.p50_s or 0.0)
    return [
        StageStatus(**{**r.__dict__, "bottleneck": r is chosen}) for r in rows
    ]
