"""The metrics port of a long-running process: ``/metrics`` and the health paths.

``conveyor worker``, ``conveyor run`` and ``conveyor controller`` take ``--metrics-port
PORT`` (or ``$CONVEYOR_METRICS_PORT``) and serve, on an aiohttp server in their own event
loop (docs/operations.md, "Metrics and health"):

* ``GET /metrics``: Prometheus text format, every registry the process registered;
* ``GET /v2/health/live``: 200 while the process runs (the Open Inference Protocol path);
* ``GET /v2/health/ready``: 200 when every readiness check passes (a worker: sessions
  loaded, broker connected, consuming), else 503 with the failing checks in the body.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from conveyor.errors import ConfigError, ConveyorError

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from conveyor.transport import Transport

log = logging.getLogger(__name__)

#: The environment variable giving ``--metrics-port`` its default.
METRICS_PORT_ENV = "CONVEYOR_METRICS_PORT"

#: A readiness check: None when it passes, else why not (shown in the 503 body).
Check = Callable[[], str | None]


def metrics_port(explicit: int | None, env: Mapping[str, str] | None = None) -> int | None:
    """``--metrics-port`` if given, else ``$CONVEYOR_METRICS_PORT``, else None (no server)."""
    if explicit is not None:
        return _port(explicit, "--metrics-port")
    raw = (os.environ if env is None else env).get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    try:
        return _port(int(raw), f"${METRICS_PORT_ENV}")
    except ValueError:
        raise ConfigError(f"${METRICS_PORT_ENV} must be a port number, got {raw!r}") from None


def _port(port: int, what: str) -> int:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} must be a port between 0 and 65535, got {port}")
    return port


@runtime_checkable
class Connected(Protocol):
    """A transport that can say whether its broker connection is up right now."""

    @property
    def connected(self) -> bool: ...


def broker_check(transport: Transport) -> Check:
    """Readiness check: the transport's broker connection is up."""

    def check() -> str | None:
        if isinstance(transport, Connected) and not transport.connected:
            return "broker connection down"
        return None

    return check


@dataclass
class ObserveServer:
    """The HTTP server on the metrics port (start once the process is set up)."""

    port: int
    #: All interfaces: Prometheus scrapes it from other containers and hosts.
    host: str = "0.0.0.0"
    registries: list[CollectorRegistry] = field(default_factory=list)
    checks: dict[str, Check] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    bound_port: int = 0

    def add_registry(self, registry: CollectorRegistry) -> None:
        self.registries.append(registry)

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    def not_ready(self) -> list[str]:
        """The failing readiness checks, as ``name: why``."""
        failing = []
        for name, check in self.checks.items():
            why = check()
            if why is not None:
                failing.append(f"{name}: {why}")
        return failing

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/v2/health/ready", self._ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot serve metrics on port {self.port}: {exc.strerror or exc} "
                f"(choose another with --metrics-port or ${METRICS_PORT_ENV})"
            ) from exc
        self._runner = runner
        addresses = runner.addresses  # port 0 asks the system for a free one
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        log.info("metrics and health on http://%s:%d/metrics", self.host, self.bound_port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return b"".join(generate_latest(r) for r in self.registries)

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(
            body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _live(self, request: web.Request) -> web.Response:
        from aiohttp import web

        return web.json_response({"live": True})

    async def _ready(self, request: web.Request) -> web.Response:
        from aiohttp import web

        failing = self.not_ready()
        return web.json_response(
            {"ready": not failing, "failing": failing}, status=503 if failing else 200
        )


class QueueCollector:
    """``conveyor_queue_depth`` and ``conveyor_queue_consumers`` per queue, read at scrape
    time from ``stats(queue) -> (ready messages, consumers)`` (the embedded broker of a
    ``conveyor run`` process, whose queues nothing outside the process can see)."""

    def __init__(self, queues: dict[str, str], stats: Callable[[str], tuple[int, int]]) -> None:
        self.queues = queues  # queue -> stage
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily(
            "conveyor_queue_depth", "Messages ready in a stage's queue", labels=["stage", "queue"]
        )
        consumers = GaugeMetricFamily(
            "conveyor_queue_consumers", "Consumers of a stage's queue", labels=["stage", "queue"]
        )
        for queue, stage in self.queues.items():
            try:
                ready, count = self.stats(queue)
            except ConveyorError:
                continue  # not declared (yet)
            depth.add_metric([stage, queue], ready)
            consumers.add_metric([stage, queue], count)
        return [depth, consumers]
