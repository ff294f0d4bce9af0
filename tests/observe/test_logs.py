"""Failed requests are logged with their ids, not flooded; --log-format json carries them."""

from __future__ import annotations

import io
import json
import logging

from conveyor.app.cli import build_parser
from conveyor.app.logs import JsonFormatter
from conveyor.envelope import RequestMeta
from conveyor.errors import CodecError
from conveyor.tracing import new_traceparent, trace_of
from workers.logs import RequestLog


def _logger() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.requestlog.{id(out)}")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger, out


def test_a_failure_line_names_cause_request_and_trace_as_json_fields() -> None:
    logger, out = _logger()
    tp = new_traceparent()
    RequestLog(logger).failure(
        RequestMeta("req-1", trace_id=tp), CodecError("tensor 'x' has dtype int8"),
        stage="s0", dead_lettered=True,
    )
    line = json.loads(out.getvalue())
    assert line["level"] == "WARNING"
    assert (line["request_id"], line["trace_id"], line["stage"], line["error_code"]) == (
        "req-1", trace_of(tp), "s0", "codec_error")
    assert "dtype int8" in line["message"] and "dead-lettered" in line["message"]


def test_a_flood_is_cut_to_the_limit_and_counted() -> None:
    logger, out = _logger()
    log = RequestLog(logger, per_second=5)
    for i in range(100):
        log.failure(RequestMeta(f"r{i}"), CodecError("bad"), stage="s0", dead_lettered=True)
    log._windows["codec_error"].started -= 1.0  # a second later
    log.failure(RequestMeta("late"), CodecError("bad"), stage="s0", dead_lettered=True)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [x["request_id"] for x in lines if "request_id" in x] == [
        "r0", "r1", "r2", "r3", "r4", "late"]
    (summary,) = [x for x in lines if "suppressed" in x]
    assert summary["suppressed"] == 95


def test_log_format_and_verbose_go_before_or_after_the_command() -> None:
    parser = build_parser()
    after = parser.parse_args(["status", "plan", "--log-format", "json", "-v"])
    before = parser.parse_args(["--log-format", "json", "status", "plan"])
    assert after.log_format == before.log_format == "json" and after.verbose == 1
