"""``conveyor gateway``: the Open Inference Protocol (KServe v2) REST front door of a plan.

    async with serve_gateway(plan, BrokerTarget(None), GatewaySettings(port=8000)) as gw:
        ...   # gw.url: http://127.0.0.1:8000; Triton / KServe clients and perf tools work

The plan is one model named as ``plan.json``'s ``name`` (version ``1``), its inputs and
outputs named as the plan's. Every HTTP request becomes one ``Client.infer`` on the one
client the gateway shares among its handlers, so the requests that arrive in the same
event-loop turn leave as one request pack, exactly as the SDK's do. Without a broker the
plan's workers run in this process on the embedded broker; with one the gateway is just
another client of the RabbitMQ pipeline (run as many side by side as you like).

Errors map to the protocol (docs/gateway.md): a bad tensor is 400 with the codec's text,
a full input queue 503 with ``Retry-After``, a passed deadline 504, a failed stage 500 with
the worker's message, a body over ``max_body_bytes`` 413 before it is read in full.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from conveyor import __version__
from conveyor.app.oip import (
    HEADER_LENGTH,
    build_infer_response,
    model_metadata,
    parse_infer_request,
)
from conveyor.errors import (
    BackpressureError,
    CodecError,
    ConfigError,
    ConveyorError,
    DeadlineExceeded,
    InferenceError,
    PlanError,
    TransportError,
)

if TYPE_CHECKING:
    from conveyor.app.transports import BrokerTarget
    from conveyor.client import Client
    from conveyor.plan import Plan

log = logging.getLogger("conveyor.gateway")

MODEL_VERSION = "1"
#: Extensions of the protocol this gateway implements (``GET /v2``).
EXTENSIONS = ("binary_tensor_data",)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class GatewaySettings:
    """How a gateway listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8000
    #: Largest request body accepted (bytes); a larger one is refused with 413 unread.
    max_body_bytes: int = 64 * 1024 * 1024
    #: Seconds a request may take when its ``timeout`` parameter does not say.
    timeout: float = 30.0
    #: The ``Retry-After`` (seconds) of a 503 answered for a full queue.
    retry_after_s: int = 1
    #: Also serve the KServe v2 gRPC service on this port (0: any); None: REST only.
    grpc_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")


class GatewayState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    STOPPING = "stopping"


class HttpError(Exception):
    """An answer other than 200, with the protocol's ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def status_of(exc: ConveyorError, retry_after_s: int) -> HttpError:
    """The HTTP answer for an error of the pipeline (the one map, docs/gateway.md)."""
    if isinstance(exc, CodecError | ConfigError):
        return HttpError(400, str(exc))
    if isinstance(exc, BackpressureError):
        return HttpError(503, str(exc), {"Retry-After": str(retry_after_s)})
    if isinstance(exc, DeadlineExceeded):
        return HttpError(504, str(exc))
    if isinstance(exc, PlanError):
        return HttpError(409, str(exc))
    if isinstance(exc, TransportError):
        # The broker is gone or closing: the caller may retry elsewhere or later.
        return HttpError(503, str(exc), {"Retry-After": str(retry_after_s)})
    if isinstance(exc, InferenceError):
        return HttpError(500, str(exc))
    return HttpError(500, f"{type(exc).__name__}: {exc}")


class GatewayMetrics:
    """The gateway's Prometheus metrics, on a registry of its own (several per process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("conveyor_gateway_requests", "Infer requests answered, by "
                                "HTTP status", ["code"], registry=self.registry)
        self.latency = Histogram(
            "conveyor_gateway_request_seconds", "Infer request time, body read to answer",
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
            registry=self.registry)
        self.in_flight = Gauge("conveyor_gateway_in_flight", "Infer requests being served",
                               registry=self.registry)
        self.sent = Gauge("conveyor_gateway_client_requests_sent", "Requests the shared "
                          "client sent", registry=self.registry)
        self.messages = Gauge("conveyor_gateway_client_messages_sent", "Messages the shared "
                              "client published (a request pack counts once)",
                              registry=self.registry)
        self.ready = Gauge("conveyor_gateway_ready", "1 while the gateway serves",
                           registry=self.registry)


class Gateway:
    """The OIP REST application of one plan over one open ``Client``."""

    def __init__(self, plan: Plan, client: Client, settings: GatewaySettings) -> None:
        self.plan = plan
        self.client = client
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.state = GatewayState.STARTING
        self._output_order = [t.name for t in plan.outputs]

    def application(self) -> web.Application:
        # client_max_size guards chunked bodies, which carry no Content-Length to check.
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[self._errors])
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/metrics", self.prometheus)
        for base in (model, versioned):
            app.router.add_get(base, self.model_metadata)
            app.router.add_get(base + "/ready", self.model_ready)
            app.router.add_post(base + "/infer", self.infer)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as exc:
            return _error(exc.status, str(exc), exc.headers)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the request body is over the limit of "
                          f"{self.settings.max_body_bytes} bytes")
        except web.HTTPException as exc:
            return _error(exc.status, exc.reason)

    # -- health and metadata --------------------------------------------------------------
    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "conveyor", "version": __version__,
                                  "extensions": list(EXTENSIONS)})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.state is GatewayState.SERVING
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return web.json_response(model_metadata(self.plan, MODEL_VERSION))

    async def model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return await self.ready(request)

    async def prometheus(self, request: web.Request) -> web.Response:
        stats = self.client.stats()
        self.metrics.sent.set(stats.sent)
        self.metrics.messages.set(stats.messages_sent)
        self.metrics.ready.set(1 if self.state is GatewayState.SERVING else 0)
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _check_model(self, request: web.Request) -> None:
        name = request.match_info["name"]
        version = request.match_info.get("version", MODEL_VERSION)
        if name != self.plan.name or version != MODEL_VERSION:
            raise HttpError(404, f"unknown model {name!r} version {version!r}; this gateway "
                            f"serves {self.plan.name!r} version {MODEL_VERSION!r}")

    # -- inference ------------------------------------------------------------------------
    async def infer(self, request: web.Request) -> web.Response:
        self._check_model(request)
        if self.state is not GatewayState.SERVING:
            raise HttpError(503, f"the gateway is {self.state.value}",
                            {"Retry-After": str(self.settings.retry_after_s)})
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        code = 500
        try:
            response = await self._infer(request)
            code = 200
            return response
        except HttpError as exc:
            code = exc.status
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(str(code)).inc()
            self.metrics.latency.observe(time.perf_counter() - start)

    async def _infer(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        try:
            parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH), self.plan)
            outputs = await self.client.infer(
                parsed.inputs, timeout=parsed.timeout_s or self.settings.timeout,
                key=parsed.partition_key,
            )
            payload, header_length = build_infer_response(
                self.plan.name, MODEL_VERSION, parsed, outputs, self._output_order)
        except ConveyorError as exc:
            raise status_of(exc, self.settings.retry_after_s) from exc
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            # Refused on the header alone: not a byte more of the body is read.
            raise HttpError(413, f"the request body ({request.content_length} bytes) is over "
                            f"the limit of {limit} bytes")
        return await request.read()


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json", headers=headers)


@dataclass(frozen=True)
class RunningGateway:
    url: str
    gateway: Gateway
    #: ``host:port`` of the gRPC service, None when it is off.
    grpc_address: str | None = None


@contextlib.asynccontextmanager
async def serve_gateway(
    plan: Plan,
    target: BrokerTarget,
    settings: GatewaySettings,
    *,
    worker_options: Mapping[str, Any] | None = None,
    durable: bool = True,
    declare_topology: bool = True,
) -> AsyncIterator[RunningGateway]:
    """Open the plan's client on ``target`` and listen; stop listening, then close it.
    ``declare_topology=False``: the admin step declared it (a least-privilege client user)."""
    from conveyor.app.connect import connect

    client = connect(target.url, plan=plan, timeout=settings.timeout,
                     worker_options=worker_options, durable=durable,
                     persistent=target.persistent, declare_topology=declare_topology)
    async with client:
        gateway = Gateway(plan, client, settings)
        runner = web.AppRunner(gateway.application(), access_log=None)
        await runner.setup()
        stack = contextlib.AsyncExitStack()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            try:
                await site.start()
            except OSError as exc:
                raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: "
                                  f"{exc.strerror or exc}") from exc
            host, port = runner.addresses[0][:2]
            grpc_address = None
            if settings.grpc_port is not None:
                from conveyor.app.gateway_grpc import start_grpc

                grpc_server, grpc_port = await start_grpc(gateway, settings.host,
                                                          settings.grpc_port)
                stack.push_async_callback(grpc_server.stop, 1.0)
                grpc_address = f"{host}:{grpc_port}"
            gateway.state = GatewayState.SERVING
            log.info("gateway: plan %r on http://%s:%s via %s", plan.name, host, port,
                     target.describe())
            yield RunningGateway(f"http://{host}:{port}", gateway, grpc_address)
        finally:
            gateway.state = GatewayState.STOPPING
            await stack.aclose()
            await runner.cleanup()
