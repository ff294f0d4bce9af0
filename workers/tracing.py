"""One OpenTelemetry span per request per stage, linked across processes (optional).

With the ``opentelemetry`` extra installed and a tracer provider set in the process
(``trace.set_tracer_provider``, as any OpenTelemetry setup does), each stage records a span
``conveyor.stage <name>`` for every request it runs: from the moment the request reached
the stage's worker to the end of its batch's run, with events ``batched`` (its batch
started) and attributes for the request id, the batch size and the waits. Its parent is the
span named by the request's ``traceparent`` (the client's, or the previous stage's); the
request then travels on with this span as its parent, so a trace shows every stage of a
request in order, whichever processes ran them.

Without OpenTelemetry, or without a provider, nothing is recorded and the ``traceparent``
travels unchanged (``StageTracer.for_process`` returns None): the hot path pays nothing.
``CONVEYOR_TRACING=off`` turns spans off even where a provider is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from conveyor.tracing import parse, with_parent

if TYPE_CHECKING:
    from workers.runner import Request

#: ``off`` disables spans even where OpenTelemetry is set up.
TRACING_ENV = "CONVEYOR_TRACING"


class StageTracer:
    """Records the spans of one stage (see the module doc)."""

    def __init__(self, stage: str, worker_id: str, tracer: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        self.stage = stage
        self.worker_id = worker_id
        self._tracer = tracer
        self._trace = trace
        self._span_context = SpanContext
        self._non_recording = NonRecordingSpan
        self._flags = TraceFlags

    @classmethod
    def for_process(cls, stage: str, worker_id: str) -> StageTracer | None:
        """A tracer when OpenTelemetry is installed and a provider is set, else None."""
        if os.environ.get(TRACING_ENV, "").strip().lower() in ("off", "0", "false", "no"):
            return None
        try:
            from opentelemetry import trace
        except ImportError:
            return None
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return None  # nobody set a provider: spans would go nowhere
        return cls(stage, worker_id, trace.get_tracer("conveyor.workers"))

    def record(
        self, requests: Sequence[Request], started: float, finished: float, error: str | None
    ) -> None:
        """One span per request of a batch that ran from ``started`` to ``finished``
        (``time.perf_counter()``); each request goes on with its span as the parent."""
        # perf_counter -> wall clock nanoseconds, once per batch.
        offset = time.time_ns() - int(time.perf_counter() * 1e9)
        batch_start = int(started * 1e9) + offset
        end = int(finished * 1e9) + offset
        for request in requests:
            parent = self._parent(request.meta.trace_id)
            span = self._tracer.start_span(
                f"conveyor.stage {self.stage}",
                context=parent,
                kind=self._trace.SpanKind.CONSUMER,
                start_time=int(request.arrived * 1e9) + offset,
                attributes={
                    "conveyor.stage": self.stage,
                    "conveyor.worker": self.worker_id,
                    "conveyor.request_id": request.meta.request_id,
                    "conveyor.batch_size": len(requests),
                    "conveyor.batch_wait_s": max(0.0, started - request.arrived),
                    "conveyor.compute_s": finished - started,
                },
            )
            span.add_event("batched", timestamp=batch_start)
            if error is not None:
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
            span.end(end_time=end)
            traceparent = request.meta.trace_id
            if traceparent is not None and parse(traceparent) is not None:
                span_id = f"{span.get_span_context().span_id:016x}"
                request.meta = replace(request.meta, trace_id=with_parent(traceparent, span_id))

    def _parent(self, traceparent: str | None) -> Any:
        ids = parse(traceparent)
        if ids is None:
            return None
        trace_id, parent_id, flags = ids
        context = self._span_context(
            trace_id=int(trace_id, 16),
            span_id=int(parent_id, 16),
            is_remote=True,
            trace_flags=self._flags(int(flags, 16)),
        )
        return self._trace.set_span_in_context(self._non_recording(context))
