"""Log lines about requests: their ids on every line, and no flood when thousands fail.

``RequestLog.failure`` writes one line per failed request (cause, request id, trace id,
stage, what happens to the delivery) with the ids also as ``extra`` fields
(``request_id``, ``trace_id``, ``stage``, ``error_code``) for ``--log-format json``. Under a
flood it keeps at most ``per_second`` lines a second per error code and then writes one
line saying how many it left out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from conveyor.envelope import RequestMeta
from conveyor.errors import ConveyorError
from conveyor.tracing import trace_of

#: Lines per second per error code before the rest are only counted.
PER_SECOND = 20


@dataclass
class _Window:
    started: float = 0.0
    written: int = 0
    suppressed: int = 0


@dataclass
class RequestLog:
    logger: logging.Logger
    per_second: int = PER_SECOND
    _windows: dict[str, _Window] = field(default_factory=dict)

    def failure(
        self,
        meta: RequestMeta,
        error: ConveyorError,
        *,
        stage: str | None,
        dead_lettered: bool,
        level: int = logging.WARNING,
    ) -> None:
        if not self.logger.isEnabledFor(level) or not self._admit(error.code, level):
            return
        trace = trace_of(meta.trace_id)
        fate = "dead-lettered" if dead_lettered else "not run"
        self.logger.log(
            level,
            "request %s trace %s failed at stage %s (%s): %s; %s, error reply sent",
            meta.request_id, trace, stage or "-", error.code, error, fate,
            extra={"request_id": meta.request_id, "trace_id": trace, "stage": stage,
                   "error_code": error.code},
        )

    def dropped(
        self, meta: RequestMeta, code: str, why: str, *, stage: str | None,
        level: int = logging.INFO,
    ) -> None:
        """A request acked and dropped unrun, without an error reply (nobody to read it)."""
        if not self.logger.isEnabledFor(level) or not self._admit(code, level):
            return
        trace = trace_of(meta.trace_id)
        self.logger.log(
            level, "request %s trace %s dropped at stage %s (%s): %s; not run, no reply",
            meta.request_id, trace, stage or "-", code, why,
            extra={"request_id": meta.request_id, "trace_id": trace, "stage": stage,
                   "error_code": code},
        )

    def _admit(self, code: str, level: int) -> bool:
        now = time.monotonic()
        window = self._windows.setdefault(code, _Window(now))
        if now - window.started >= 1.0:
            if window.suppressed:
                self.logger.log(
                    level, "%d more requests failed with %s in the last %.0f s (not logged)",
                    window.suppressed, code, now - window.started,
                    extra={"error_code": code, "suppressed": window.suppressed},
                )
            window.started, window.written, window.suppressed = now, 0, 0
        if window.written < self.per_second:
            window.written += 1
            return True
        window.suppressed += 1
        return False
