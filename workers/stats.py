"""Statistics a worker reports (frozen snapshots; the controller reads them from heartbeats)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from conveyor import control
from conveyor.plan import MODEL_INPUT

ControlStats = control.WorkerStats

#: Weight of the newest sample in the moving averages.
EWMA_ALPHA = 0.2


@dataclass(frozen=True)
class StageStats:
    stage: str
    #: Execution provider the session actually got ("CPUExecutionProvider", ...), "" for the
    #: ingress (no session).
    provider: str
    requests: int
    batches: int
    rows: int
    errors: int
    expired: int
    #: Requests accepted and not yet handed on (waiting to batch, queued or running).
    in_flight: int
    last_batch: int
    mean_batch: float
    #: Moving average of session time per batch and per request, milliseconds.
    service_ms_per_batch: float
    service_ms_per_request: float
    max_batch: int
    max_delay_ms: float


@dataclass(frozen=True)
class ConsumerStats:
    queue: str
    stage: str
    prefetch: int
    #: Deliveries received and not yet settled.
    unsettled: int
    consuming: bool


@dataclass(frozen=True)
class WorkerStats:
    worker_id: str
    plan_hash: str
    state: str
    stages: tuple[StageStats, ...] = ()
    consumers: tuple[ConsumerStats, ...] = field(default=())


class StageCounters:
    """Mutable counters behind ``StageStats`` (one per hosted stage or ingress)."""

    def __init__(self, stage: str, provider: str, max_batch: int, max_delay_ms: float) -> None:
        self.stage = stage
        self.provider = provider
        self.max_batch = max_batch
        self.max_delay_ms = max_delay_ms
        self.requests = 0
        self.batches = 0
        self.rows = 0
        self.errors = 0
        self.expired = 0
        self.in_flight = 0
        self.last_batch = 0
        self.max_rows = 0
        self.ms_per_batch = 0.0
        self.ms_per_request = 0.0

    def record_batch(self, requests: int, rows: int, seconds: float) -> None:
        ms = seconds * 1000.0
        per_request = ms / max(1, requests)
        if self.batches == 0:
            self.ms_per_batch, self.ms_per_request = ms, per_request
        else:
            a = EWMA_ALPHA
            self.ms_per_batch = (1 - a) * self.ms_per_batch + a * ms
            self.ms_per_request = (1 - a) * self.ms_per_request + a * per_request
        self.batches += 1
        self.requests += requests
        self.rows += rows
        self.last_batch = requests
        self.max_rows = max(self.max_rows, rows)

    def snapshot(self) -> StageStats:
        return StageStats(
            stage=self.stage,
            provider=self.provider,
            requests=self.requests,
            batches=self.batches,
            rows=self.rows,
            errors=self.errors,
            expired=self.expired,
            in_flight=self.in_flight,
            last_batch=self.last_batch,
            mean_batch=self.requests / self.batches if self.batches else 0.0,
            service_ms_per_batch=self.ms_per_batch,
            service_ms_per_request=self.ms_per_request,
            max_batch=self.max_batch,
            max_delay_ms=self.max_delay_ms,
        )


def control_snapshot(
    *,
    first_stage: str,
    counters: Mapping[str, StageCounters],
    consuming: tuple[control.QueueConsumption, ...],
    hosted: tuple[str, ...],
    home: tuple[str, ...],
    routing_keys: Mapping[str, int],
    providers: Mapping[str, str],
) -> control.WorkerStats:
    """A worker's figures in the control plane's terms (``StageWorker.snapshot``).

    The ingress (decoding and batching requests for the first stage) is reported as part
    of the first stage: its errors and the requests waiting in its batcher count there.
    """
    ingress = counters.get(MODEL_INPUT)
    stages = []
    for name, c in counters.items():
        if name == MODEL_INPUT:
            continue
        extra_errors = extra_in_flight = 0
        if name == first_stage and ingress is not None:
            extra_errors, extra_in_flight = ingress.errors, ingress.in_flight
        stages.append(
            control.StageStats(
                stage=name,
                requests=c.requests,
                batches=c.batches,
                errors=c.errors + extra_errors,
                in_flight=c.in_flight + extra_in_flight,
                service_s_per_request=c.ms_per_request / 1000.0,
                service_s_per_batch=c.ms_per_batch / 1000.0,
                mean_batch=c.rows / c.batches if c.batches else 0.0,
                max_batch=c.max_rows,
            )
        )
    return control.WorkerStats(
        stages_available=hosted,
        home_stages=home,
        consuming=consuming,
        stages=tuple(stages),
        routing_keys=dict(routing_keys),
        provider=",".join(sorted(set(providers.values()))),
    )
