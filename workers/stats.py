"""Statistics a worker reports (frozen snapshots; the controller reads them from heartbeats)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
