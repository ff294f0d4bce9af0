"""Worker settings: one frozen record (STYLE point 9), built from arguments or the environment."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.errors import ConfigError
from workers.batching import WAIT_POLICIES, WaitPolicy

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def parse_device(device: str) -> str:
    """Check a ``--device`` value: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    value = device.strip().lower()
    if not _DEVICE.match(value):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return value


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker process runs its stages.

    ``intra_op_threads`` / ``inter_op_threads``: onnxruntime thread pools per session;
    ``None`` divides ``os.cpu_count()`` evenly among the stages hosted in the process.
    ``max_batch`` / ``max_delay_ms`` / ``prefetch``: ``None`` takes the plan's schedule
    for each stage. ``shard``: only this input (stage 0) or join shard; ``None`` = all.
    ``grace``: seconds a shutdown waits for batches in flight. ``batch_wait``: when a
    partial batch goes (``workers.batching``): ``"idle"`` = as soon as the stage is free
    (``max_delay_ms`` caps the wait for a burst still arriving), ``"window"`` = after
    ``max_delay_ms`` even when the stage is idle.
    """

    device: str = "auto"
    intra_op_threads: int | None = None
    inter_op_threads: int = 1
    max_batch: int | None = None
    max_delay_ms: float | None = None
    prefetch: int | None = None
    shard: int | None = None
    grace: float = 10.0
    #: Seconds a join waits for the missing parts of a request (without a sooner deadline)
    #: before it dead-letters the parts it has and answers with an error.
    join_timeout: float = 60.0
    #: A join queue's prefetch doubles while its window is full of parts waiting for their
    #: partners (else the partners could never be delivered), up to this many messages.
    join_prefetch_max: int = 4096
    #: Declare durable queues/exchanges (off: throw-away ones); all processes must agree.
    durable: bool = True
    batch_wait: WaitPolicy = "idle"
    #: Measure durations and batch sizes for the metrics (``workers.metrics``); off only
    #: to measure what measuring costs (bench/bench_pipeline.py ``--metrics off``).
    metrics: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", parse_device(self.device))
        for name in ("intra_op_threads", "max_batch", "prefetch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.inter_op_threads < 1:
            raise ConfigError(f"inter_op_threads must be at least 1, got {self.inter_op_threads}")
        if self.max_delay_ms is not None and self.max_delay_ms < 0:
            raise ConfigError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        if self.batch_wait not in WAIT_POLICIES:
            raise ConfigError(f"batch_wait must be one of {WAIT_POLICIES}, got {self.batch_wait!r}")
        if self.shard is not None and self.shard < 0:
            raise ConfigError(f"shard must be >= 0, got {self.shard}")
        if self.grace < 0:
            raise ConfigError(f"grace must be >= 0, got {self.grace}")
        if self.join_prefetch_max < 1:
            raise ConfigError(f"join_prefetch_max must be at least 1, got {self.join_prefetch_max}")
        if self.join_timeout <= 0:
            raise ConfigError(f"join_timeout must be > 0, got {self.join_timeout}")

    def threads_per_stage(self, hosted_stages: int) -> int:
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return max(1, (os.cpu_count() or 1) // max(1, hosted_stages))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read ``CONVEYOR_DEVICE``, ``CONVEYOR_THREADS``, ``CONVEYOR_MAX_BATCH``,
        ``CONVEYOR_MAX_DELAY_MS``, ``CONVEYOR_PREFETCH``, ``CONVEYOR_GRACE``."""
        e = os.environ if env is None else env

        def num(name: str, kind: type[int] | type[float]) -> int | float | None:
            raw = e.get(name)
            if raw is None or raw == "":
                return None
            try:
                return kind(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r} is not a {kind.__name__}") from exc

        threads = num("CONVEYOR_THREADS", int)
        max_batch = num("CONVEYOR_MAX_BATCH", int)
        prefetch = num("CONVEYOR_PREFETCH", int)
        delay = num("CONVEYOR_MAX_DELAY_MS", float)
        grace = num("CONVEYOR_GRACE", float)
        return cls(
            device=e.get("CONVEYOR_DEVICE", "auto"),
            intra_op_threads=None if threads is None else int(threads),
            max_batch=None if max_batch is None else int(max_batch),
            max_delay_ms=delay,
            prefetch=None if prefetch is None else int(prefetch),
            grace=10.0 if grace is None else float(grace),
        )
