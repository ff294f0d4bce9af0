"""``conveyor.connect``: a client for a plan, on RabbitMQ or on the embedded broker.

    async with conveyor.connect(plan="plans/mlp") as client:   # $CONVEYOR_AMQP_URL, else in-process
    async with conveyor.connect("amqp://...", plan="plans/mlp") as client:
    async with conveyor.connect(None, plan="plans/mlp") as client:    # always in-process

Without a URL the plan's workers run in this process on the embedded broker
(``local_workers``), so the same code serves a model with no RabbitMQ at all. Where the
client runs is logged at INFO once it is open.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conveyor.app.transports import BrokerTarget
from conveyor.client import DEFAULT_TIMEOUT, Client
from conveyor.client_checks import NoConsumerPolicy
from conveyor.plan import Plan

if TYPE_CHECKING:
    from brokerless import Broker
    from conveyor.transport import Transport
    from workers.stage_worker import StageWorker

log = logging.getLogger("conveyor.client")


class _FromEnv(enum.Enum):
    """``connect()``'s default URL: ``$CONVEYOR_AMQP_URL``, else the embedded broker."""

    FROM_ENV = "from-env"


FROM_ENV = _FromEnv.FROM_ENV


class LocalClient(Client):
    """The client ``connect`` returns: a ``Client`` that also knows the embedded broker
    and the in-process workers it started (None where there are none)."""

    def __init__(self, plan: Plan, target: BrokerTarget, local_workers: bool,
                 worker_options: Mapping[str, Any], **options: Any) -> None:
        super().__init__(plan, opener=self._open_target, **options)
        self.target = target
        self.local_workers = local_workers
        self._worker_options = dict(worker_options)
        self._workers: StageWorker | None = None

    @property
    def url(self) -> str | None:
        return self.target.url

    @property
    def workers(self) -> StageWorker | None:
        """The in-process workers when ``local_workers`` is on (``workers.serve``'s handle:
        ``stats()``, ``providers``)."""
        return self._workers

    @property
    def broker(self) -> Broker | None:
        """The embedded broker when the client runs in-process (connect more transports
        to it)."""
        return self.target.broker

    async def _open_target(self, stack: contextlib.AsyncExitStack) -> Transport:
        transport = await self.target.connect(plan=self.plan)
        stack.push_async_callback(transport.close, grace=1.0)
        if self.local_workers:
            # On the embedded broker the workers get a connection of their own.
            worker_transport = transport
            if self.target.embedded:
                worker_transport = await self.target.connect(plan=self.plan)
                stack.push_async_callback(worker_transport.close, grace=1.0)
            self._workers = await _start_local_workers(
                self.plan, worker_transport, self._worker_options, self._durable
            )
            stack.push_async_callback(self._stop_workers)
        log.info(
            "conveyor: plan %r on %s%s", self.plan.name, self.target.describe(),
            " with in-process workers" if self.local_workers else "",
        )
        return transport

    async def _stop_workers(self) -> None:
        workers, self._workers = self._workers, None
        if workers is not None:
            await workers.stop()


def connect(
    url: str | _FromEnv | None = FROM_ENV,
    *,
    plan: Plan | str | os.PathLike[str],
    timeout: float = DEFAULT_TIMEOUT,
    local_workers: bool | None = None,
    reply_prefetch: int = 1024,
    worker_options: Mapping[str, Any] | None = None,
    durable: bool = True,
    persistent: bool | None = None,
    pack: bool = True,
    declare_topology: bool = True,
    on_no_consumer: NoConsumerPolicy = "warn",
) -> LocalClient:
    """A client for ``plan`` on the broker at ``url``.

    ``url`` omitted: ``$CONVEYOR_AMQP_URL``, else the embedded broker; ``None``: the
    embedded broker. Use it as ``async with connect(...) as client``. ``local_workers``
    (default: true exactly when the client runs on the embedded broker) runs the plan's
    workers in this process; ``worker_options`` are passed to them (``workers.serve``).
    ``durable`` (default on) must match the workers' ``--durable``/``--no-durable``
    (RabbitMQ refuses a queue re-declared with other flags). ``persistent`` (default:
    the URL's ``?persistent=``, ``CONVEYOR_AMQP_PERSISTENT``, the plan's
    ``queues.persistent``, else on) chooses delivery mode 2 for what this client and its
    in-process workers publish on RabbitMQ. ``pack`` (default on) sends
    the requests made in one event-loop turn for one partition as one message and lets
    workers answer several in one message (``conveyor.packs``); off, every request and
    reply is a message of its own.
    ``declare_topology=False`` leaves the plan's exchanges and queues to the admin step
    (``conveyor topology PLAN_DIR``): a least-privilege client user (``conveyor users``)
    may not declare them, only its own reply queue.
    ``on_no_consumer``: see ``Client`` (warn once by default when no worker consumes).
    """
    target = BrokerTarget.resolve() if url is FROM_ENV else BrokerTarget(url)
    target.persistent = persistent
    loaded = plan if isinstance(plan, Plan) else Plan.load(Path(plan))
    return LocalClient(
        loaded,
        target,
        target.embedded if local_workers is None else local_workers,
        worker_options or {},
        timeout=timeout,
        reply_prefetch=reply_prefetch,
        durable=durable,
        pack=pack,
        declare_topology=declare_topology,
        on_no_consumer=on_no_consumer,
    )


async def _start_local_workers(
    plan: Plan, transport: Transport, options: Mapping[str, Any], durable: bool
) -> StageWorker:
    """The plan's workers in this process, declaring queues as durable as the client's
    (a broker refuses the same queue declared both ways)."""
    from dataclasses import replace

    import workers
    from workers.settings import WorkerSettings

    chosen = dict(options)
    chosen["settings"] = replace(chosen.get("settings") or WorkerSettings(), durable=durable)
    worker: StageWorker = await workers.serve(plan, transport, **chosen)
    return worker
