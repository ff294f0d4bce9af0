"""A request's trace across two worker processes on RabbitMQ: one span per stage, chained."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.client import Client
from conveyor.plan import Plan
from conveyor.tracing import new_traceparent, parse, trace_of, with_parent
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_plan

REQUESTS = 5


def test_traceparent_helpers() -> None:
    tp = new_traceparent()
    trace_id, parent, flags = parse(tp) or ("", "", "")
    assert len(trace_id) == 32 and len(parent) == 16 and flags == "01"
    assert trace_of(tp) == trace_id
    assert parse(with_parent(tp, "ab" * 8)) == (trace_id, "ab" * 8, flags)
    assert parse("trace-1") is None and trace_of("trace-1") == "trace-1"
    assert parse("00-" + "0" * 32 + "-" + "1" * 16 + "-01") is None  # all-zero trace id


@pytest.mark.rabbitmq
async def test_one_trace_per_request_one_span_per_stage_across_processes(
    rabbitmq_url: str, tmp_path: Path, unique: str
) -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace import TracerProvider

    (tmp_path / "plan").mkdir()
    plan = Plan.load(chain_plan(tmp_path / "plan", k=2, name=unique).directory)
    env = {**os.environ, "CONVEYOR_AMQP_URL": rabbitmq_url}
    procs = []
    outs = [tmp_path / f"spans-{s}.json" for s in plan.stage_names]
    for stage, out in zip(plan.stage_names, outs, strict=True):
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.observe.trace_worker",
            str(plan.directory), stage, str(out), env=env, stdout=asyncio.subprocess.PIPE,
        ))
    handle = BrokerHandle("rabbitmq", rabbitmq_url)
    # The caller's own spans, on a provider of its own (the global one stays unset).
    tracer = TracerProvider().get_tracer("test")
    client_spans: list[tuple[str, str]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            async with asyncio.timeout(60):
                while (await proc.stdout.readline()).strip() != b"ready":
                    pass
        async with Client(plan, await handle.connect()) as client:
            for _ in range(REQUESTS):
                with tracer.start_as_current_span("caller") as span:
                    ctx = span.get_span_context()
                    client_spans.append((f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"))
                    x = np.ones((1, 4), np.float32)
                    await client.infer({"x": x}, timeout=20)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                assert await proc.wait() == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await handle.cleanup()
    spans = [s for out in outs for s in json.loads(out.read_text())]
    by_trace: dict[str, list[dict[str, object]]] = {}
    for s in spans:
        by_trace.setdefault(str(s["trace_id"]), []).append(s)
    assert set(by_trace) == {t for t, _ in client_spans}  # one trace per request, the caller's
    s0, s1 = plan.stage_names
    for trace_id, caller_span in client_spans:
        mine = {str(s["attributes"]["conveyor.stage"]): s for s in by_trace[trace_id]}  # type: ignore[index]
        assert sorted(mine) == [s0, s1] and len(by_trace[trace_id]) == 2  # one span per stage
        assert mine[s0]["parent_id"] == caller_span
        assert mine[s1]["parent_id"] == mine[s0]["span_id"]
        workers = {s["attributes"]["conveyor.worker"] for s in mine.values()}  # type: ignore[index]
        assert len(workers) == 2  # two processes
