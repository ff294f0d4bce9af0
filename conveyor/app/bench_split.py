"""The per-stage split of one ``conveyor bench`` level, read from the workers' metrics.

Two samples of the metrics, before and after a level (the registries of in-process
workers, or the ``/metrics`` endpoints given with ``--metrics``), give per stage what the
level added: requests answered, mean queue wait and batch wait per request, compute per
batch and per request, and the mean batch (perf_analyzer shows the same split for a
Triton model as queue / compute). The level's warm-up falls between the two samples too.
The ingress (requests decoded and batched on the input shards) counts as the first
stage, as in the metrics themselves (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from conveyor.app.status import Samples
from conveyor.plan import Plan

#: What the split reads: key -> the metric's name (a histogram: its _sum and _count).
HISTOGRAMS = {
    "queue_wait": "conveyor_queue_wait_seconds",
    "batch_wait": "conveyor_batch_wait_seconds",
    "compute": "conveyor_compute_seconds",
    "batch_size": "conveyor_batch_size",
}
#: Stage -> figure ("queue_wait_sum", "queue_wait_count", ..., "ok") summed over processes.
Sums = dict[str, dict[str, float]]


@dataclass(frozen=True)
class StageSplit:
    stage: str
    #: Requests the stage finished without an error during the level.
    requests: float
    queue_wait_ms: float | None
    batch_wait_ms: float | None
    compute_ms_per_batch: float | None
    compute_ms_per_request: float | None
    mean_batch: float | None

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}


def sums(plan: Plan, scrapes: Iterable[Samples]) -> Sums:
    """Per stage of ``plan``, the split's counters summed over every scraped process."""
    names = {f"{metric}_{part}": f"{key}_{part}"
             for key, metric in HISTOGRAMS.items() for part in ("sum", "count")}
    out: Sums = {stage: {} for stage in plan.stage_names}
    for samples in scrapes:
        for (name, labels), value in samples.items():
            lab = dict(labels)
            figures = out.get(lab.get("stage", ""))
            if figures is None:
                continue
            if name == "conveyor_requests_total" and lab.get("outcome") == "ok":
                key = "ok"
            elif name in names:
                key = names[name]
            else:
                continue
            figures[key] = figures.get(key, 0.0) + value
    return out


def split(before: Sums, after: Sums) -> list[StageSplit]:
    """What each stage did between the two samples."""
    rows = []
    for stage, now in after.items():
        then = before.get(stage, {})

        def added(key: str, now: dict[str, float] = now, then: dict[str, float] = then) -> float:
            return now.get(key, 0.0) - then.get(key, 0.0)

        batches, batched = added("batch_size_count"), added("batch_size_sum")
        rows.append(StageSplit(
            stage=stage,
            requests=added("ok"),
            queue_wait_ms=_ms(added("queue_wait_sum"), added("queue_wait_count")),
            batch_wait_ms=_ms(added("batch_wait_sum"), added("batch_wait_count")),
            compute_ms_per_batch=_ms(added("compute_sum"), batches),
            compute_ms_per_request=_ms(added("compute_sum"), batched),
            mean_batch=batched / batches if batches > 0 else None,
        ))
    return rows


def _ms(seconds: float, count: float) -> float | None:
    return seconds / count * 1e3 if count > 0 else None


def registry_samples(registry: Any) -> Samples:
    """The samples of a prometheus_client registry, keyed as a scrape's are."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples}


def split_table(label: str, rows: Sequence[StageSplit]) -> str:
    head = ["stage", "requests", "queue wait ms", "batch wait ms", "compute ms/batch",
            "compute ms/request", "mean batch"]
    body = [[r.stage, f"{r.requests:,.0f}", _cell(r.queue_wait_ms), _cell(r.batch_wait_ms),
             _cell(r.compute_ms_per_batch), _cell(r.compute_ms_per_request),
             "-" if r.mean_batch is None else f"{r.mean_batch:.2f}"] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
             for row in [head, *body]]
    return f"per stage at {label} (from the metrics; waits are means per request):\n" + \
        "\n".join(lines)


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.3f}"
