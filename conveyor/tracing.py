"""W3C Trace Context for requests (docs/wire.md section 2, "trace id").

A request's ``trace_id`` (header ``x-conveyor-trace``, pack entry ``"trace"``) holds a
``traceparent``: ``00-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>``. The client
SDK starts one per request (or continues the caller's OpenTelemetry span, or takes the
``traceparent`` the caller passes); each stage that records a span sends its own span id on
as the parent id, so the spans of one request chain across processes. A trace id that is not
a ``traceparent`` (any other string) is carried unchanged and logged as it is.

Nothing here needs OpenTelemetry; ``workers.tracing`` records spans when it is installed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

VERSION = "00"
#: Flags: sampled (the caller wants it recorded).
SAMPLED = "01"

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def new_traceparent() -> str:
    """A fresh ``traceparent`` (random trace and parent ids, sampled)."""
    raw = os.urandom(24).hex()
    return f"{VERSION}-{raw[:32]}-{raw[32:]}-{SAMPLED}"


def parse(traceparent: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a valid ``traceparent``; None for anything else."""
    if traceparent is None or len(traceparent) != 55:
        return None
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    trace, parent, flags = match.groups()
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace, parent, flags


def trace_of(trace_id: str | None) -> str:
    """What log lines show as a request's trace: the 32-hex trace id of a ``traceparent``,
    else the string as sent ("-" when there is none)."""
    if trace_id is None:
        return "-"
    if len(trace_id) == 55 and trace_id[2] == "-" and trace_id[35] == "-":
        return trace_id[3:35]
    return trace_id


def with_parent(traceparent: str, span_id: str) -> str:
    """``traceparent`` with its parent id replaced by ``span_id`` (16 hex digits)."""
    return f"{traceparent[:36]}{span_id}{traceparent[52:]}"


def _otel_current() -> str | None:
    """The caller's OpenTelemetry span as a ``traceparent``, None when there is none."""
    if _CURRENT_SPAN is None:
        return None
    context = _CURRENT_SPAN().get_span_context()
    if not context.is_valid:
        return None
    flags = SAMPLED if context.trace_flags.sampled else "00"
    return f"{VERSION}-{context.trace_id:032x}-{context.span_id:016x}-{flags}"


def _span_getter() -> Callable[[], Any] | None:
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace.get_current_span


#: Looked up once: with OpenTelemetry installed the SDK continues the caller's span.
_CURRENT_SPAN = _span_getter()


def current_traceparent() -> str:
    """The ``traceparent`` a new request carries: the caller's OpenTelemetry span when
    there is one (the request's stages become its children), else a fresh trace."""
    continued = _otel_current()
    return new_traceparent() if continued is None else continued
