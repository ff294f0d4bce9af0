"""Where a process connects: a RabbitMQ URL, or the embedded ``brokerless`` broker.

The one place that reads ``CONVEYOR_AMQP_URL`` and chooses a transport; ``connect()``, the
CLI (``infer``, ``worker``, ``run``, ``controller``, ``demo``) and anything added later go
through it::

    target = BrokerTarget.resolve(args.broker)   # --broker, $CONVEYOR_AMQP_URL, or embedded
    transport = await target.connect()               # a new connection each call
    log.info("plan %s on %s", plan.name, target.describe())

Every ``connect()`` of an embedded target opens another connection to the same in-process
``Broker``, so a client and in-process workers share one broker.

A RabbitMQ cluster is several URLs separated by commas (``amqp://u:p@n1/,amqp://u:p@n2/``;
a comma inside a password must be written ``%2C``): ``connect`` tries them in order and uses
the first that answers. A connection lost later reconnects to the next node, in turn
(``workers.amqp.nodes``), so a process is back within a reconnect interval or two of
losing its node.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from conveyor.errors import ConfigError

if TYPE_CHECKING:
    from brokerless import Broker
    from conveyor.plan import Plan
    from conveyor.transport import Transport

log = logging.getLogger("conveyor.transports")

#: The environment variable naming the RabbitMQ URL (credentials belong here, not in argv).
AMQP_URL_ENV = "CONVEYOR_AMQP_URL"


def url_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """``$CONVEYOR_AMQP_URL``, or None when it is unset or empty."""
    value = (os.environ if env is None else env).get(AMQP_URL_ENV, "").strip()
    return value or None


@dataclass
class BrokerTarget:
    """A broker to connect to: ``url`` for RabbitMQ, None for the embedded broker."""

    url: str | None
    _broker: Broker | None = field(default=None, repr=False)
    #: Persistent messages as chosen on the command line (``--[no-]persistent``): wins
    #: over the URL's ``?persistent=``, ``CONVEYOR_AMQP_PERSISTENT`` and the plan's
    #: ``queues.persistent``; None: not chosen there.
    persistent: bool | None = None

    @classmethod
    def resolve(
        cls,
        explicit: str | None = None,
        *,
        embedded: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> BrokerTarget:
        """``explicit`` (``--broker``) wins, then ``$CONVEYOR_AMQP_URL``; ``embedded``
        (``--embedded``) forces the in-process broker and refuses an explicit URL."""
        if embedded:
            if explicit:
                raise ConfigError("--embedded and --broker exclude each other; give one")
            return cls(None)
        return cls(explicit or url_from_env(env))

    @classmethod
    def required(cls, explicit: str | None, command: str) -> BrokerTarget:
        """A RabbitMQ target for a command that cannot run on the embedded broker."""
        target = cls.resolve(explicit)
        if target.url is None:
            raise ConfigError(
                f"conveyor {command} needs a RabbitMQ URL: --broker amqp://... or "
                f"${AMQP_URL_ENV} (for one process on the embedded broker use `conveyor run`)"
            )
        return target

    @property
    def embedded(self) -> bool:
        return self.url is None

    @property
    def broker(self) -> Broker | None:
        """The in-process broker once an embedded target has connected (else None)."""
        return self._broker

    @property
    def urls(self) -> list[str]:
        """The cluster's node URLs, in the order ``connect`` tries them (empty: embedded)."""
        if self.url is None:
            return []
        nodes = [u.strip() for u in self.url.split(",") if u.strip()]
        if not nodes:
            raise ConfigError("the RabbitMQ URL list is empty")
        return nodes

    def describe(self) -> str:
        """Where this target is, for logs and stderr: host, port and vhost, no credentials."""
        if self.url is None:
            return "the embedded broker (in this process)"
        places = []
        vhost = "/"
        for url in self.urls:
            parts = urlsplit(url)
            vhost = parts.path[1:] or "/"
            port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
            places.append(f"{parts.hostname or 'localhost'}:{port}")
        return f"RabbitMQ at {', '.join(places)} (vhost {vhost!r})"

    async def connect(self, *, plan: Plan | None = None) -> Transport:
        """A new connection (``Transport``) to this target; the caller closes it. ``plan``:
        the plan it serves, whose ``queues.persistent`` applies below the URL and
        environment (persistence means nothing to the embedded broker)."""
        if self.url is None:
            if self._broker is None:
                from brokerless import Broker

                self._broker = Broker()
            return self._broker.connect()
        from conveyor.errors import BrokerUnreachable
        from workers.amqp import AmqpSettings, AmqpTransport

        nodes = self.urls
        chosen = plan.queues.persistent if plan is not None else None
        defaults = {} if chosen is None else {"persistent": chosen}
        for i, url in enumerate(nodes):
            # The plan, the URL, then CONVEYOR_AMQP_* (TLS files, timeouts) from the
            # environment, then the command line; a lost connection later goes on to the
            # other nodes in turn.
            settings = AmqpSettings.from_url_and_env(url, defaults=defaults)
            if self.persistent is not None:
                settings = settings.with_values({"persistent": self.persistent})
            others = nodes[i + 1:] + nodes[:i]
            try:
                return await AmqpTransport.connect(settings.with_other_nodes(others))
            except BrokerUnreachable:
                if i == len(nodes) - 1:
                    raise
                log.warning("conveyor: node %d of %d unreachable, trying the next", i + 1,
                            len(nodes))
        raise AssertionError("unreachable: the loop returns or raises")
