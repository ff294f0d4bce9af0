"""A worker process that records its spans in memory and writes them out when stopped.

    python -m tests.observe.trace_worker PLAN_DIR STAGE SPANS_JSON   (CONVEYOR_AMQP_URL set)

Prints ``ready`` once consuming; on SIGTERM stops and writes every span it recorded as a
JSON list (name, trace id, span id, parent span id, attributes).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor.plan import Plan
from workers.amqp import AmqpTransport
from workers.stage_worker import StageWorker


async def main(plan_dir: str, stage: str, out: str) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    transport = await AmqpTransport.connect(os.environ["CONVEYOR_AMQP_URL"])
    worker = StageWorker(Plan.load(Path(plan_dir)), transport, [stage])
    await worker.start()
    print("ready", flush=True)
    await stop.wait()
    await worker.stop(grace=2.0)
    await transport.close(grace=1.0)
    spans = [
        {
            "name": s.name,
            "trace_id": f"{s.context.trace_id:032x}",
            "span_id": f"{s.context.span_id:016x}",
            "parent_id": None if s.parent is None else f"{s.parent.span_id:016x}",
            "attributes": dict(s.attributes or {}),
        }
        for s in exporter.get_finished_spans()
    ]
    await asyncio.to_thread(Path(out).write_text, json.dumps(spans))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
