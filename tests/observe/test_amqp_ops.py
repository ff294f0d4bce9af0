"""RabbitMQ only: readiness when the broker drops the worker's connection, and errors
that say the fix (a missing vhost, a missing exchange plugin)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from conveyor.app.observe import ObserveServer, broker_check
from conveyor.errors import BrokerUnreachable, TransportError
from conveyor.transport import ExchangeSpec
from tests.observe.conftest import Management
from tests.observe.scrape import get
from tests.support.plans import chain_plan
from workers.amqp import AmqpTransport
from workers.amqp.settings import AmqpSettings
from workers.amqp.transport import missing_plugin_error
from workers.stage_worker import StageWorker

pytestmark = pytest.mark.rabbitmq


async def _ready_status(port: int) -> int:
    return (await get(port, "/v2/health/ready"))[0]


async def _until_status(port: int, want: int, within: float = 30.0, every: float = 0.02) -> None:
    until = time.monotonic() + within
    while await _ready_status(port) != want:
        assert time.monotonic() < until, f"readiness never answered {want}"
        await asyncio.sleep(every)


async def test_ready_drops_to_503_when_the_broker_closes_the_connection(
    rabbitmq_url: str, management: Management, tmp_path: Path
) -> None:
    name = f"t-ready-{uuid.uuid4().hex[:8]}"
    settings = replace(
        AmqpSettings.from_url(rabbitmq_url), connection_name=name, reconnect_interval_s=1.0
    )
    transport = await AmqpTransport.connect(settings)
    plan = chain_plan(tmp_path, 2, name=name.replace("-", ""))
    worker = StageWorker(plan, transport)
    server = ObserveServer(0, host="127.0.0.1")
    server.add_check("worker", lambda: None if worker.ready else worker.state.value)
    server.add_check("broker", broker_check(transport))
    await server.start()
    try:
        await worker.start()
        assert await _ready_status(server.bound_port) == 200
        await management.close_connection(f"{name}-con")
        # aio-pika's first reconnect attempt is immediate: the 503 may last only the tens
        # of milliseconds of a reconnect, so ask without pausing.
        await _until_status(server.bound_port, 503, every=0)
        await _until_status(server.bound_port, 200)  # the robust connection came back
    finally:
        await worker.stop(grace=0.5)
        await server.stop()
        await transport.close(grace=0.5)


async def test_a_missing_vhost_says_so(rabbitmq_url: str) -> None:
    settings = AmqpSettings.from_url(rabbitmq_url)
    vhost = f"nosuch-{uuid.uuid4().hex[:8]}"
    url = settings.aio_pika_url().split("?")[0].rsplit("/", 1)[0] + f"/{vhost}"
    with pytest.raises(BrokerUnreachable, match=f"vhost '{vhost}': vhost not found"):
        await AmqpTransport.connect(url)


@dataclass(frozen=True)
class _Type:
    """An exchange type no plugin on the broker provides."""

    value: str


async def test_an_exchange_type_the_broker_lacks_names_the_plugin(rabbitmq_url: str) -> None:
    transport = await AmqpTransport.connect(rabbitmq_url)
    try:
        spec = ExchangeSpec(f"t.{uuid.uuid4().hex[:8]}", _Type("x-nosuch"))  # type: ignore[arg-type]
        with pytest.raises(TransportError, match="no exchange type 'x-nosuch': enable"):
            await transport.declare_exchange(spec)
        hint = str(missing_plugin_error("x-consistent-hash", "h:5672"))
        assert "`rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`" in hint
    finally:
        await transport.close(grace=0.5)
