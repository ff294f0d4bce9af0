"""Connection settings for the RabbitMQ transport, as one frozen record.

``AmqpSettings.from_url("amqp://user:pass@host:5672/vhost")``, or
``AmqpSettings.from_url_and_env(url)`` (the URL, then the optional ``CONVEYOR_AMQP_*``
variables below). Which URL a process uses is the application's choice
(``conveyor.app.transports``, the one reader of ``CONVEYOR_AMQP_URL``). The URL carries
the credentials; the record's ``repr`` and every error message use ``safe_url``, which
hides the password.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from conveyor.errors import ConfigError

#: Optional environment variables read by ``from_url_and_env``, mapped to field names.
ENV_FIELDS: dict[str, str] = {
    "CONVEYOR_AMQP_HEARTBEAT": "heartbeat_s",
    "CONVEYOR_AMQP_CONNECT_TIMEOUT": "connect_timeout_s",
    "CONVEYOR_AMQP_CONFIRM_TIMEOUT": "confirm_timeout_s",
    "CONVEYOR_AMQP_OPERATION_TIMEOUT": "operation_timeout_s",
    "CONVEYOR_AMQP_RECONNECT_INTERVAL": "reconnect_interval_s",
    "CONVEYOR_AMQP_CONNECTION_NAME": "connection_name",
    "CONVEYOR_AMQP_SPEEDUPS": "speedups",
    "CONVEYOR_AMQP_PERSISTENT": "persistent",
    "CONVEYOR_AMQP_CAFILE": "cafile",
    "CONVEYOR_AMQP_CERTFILE": "certfile",
    "CONVEYOR_AMQP_KEYFILE": "keyfile",
    "CONVEYOR_AMQP_TLS_VERIFY": "verify_tls",
}

#: URL query parameters ``from_url`` accepts, mapped to field names.
QUERY_FIELDS: dict[str, str] = {
    "heartbeat": "heartbeat_s",
    "connect_timeout": "connect_timeout_s",
    "confirm_timeout": "confirm_timeout_s",
    "operation_timeout": "operation_timeout_s",
    "reconnect_interval": "reconnect_interval_s",
    "name": "connection_name",
    "speedups": "speedups",
    "persistent": "persistent",
    "cafile": "cafile",
    "certfile": "certfile",
    "keyfile": "keyfile",
    "verify": "verify_tls",
}
#: The settings that only mean something on ``amqps://``.
TLS_FIELDS = ("cafile", "certfile", "keyfile")


@dataclass(frozen=True)
class AmqpSettings:
    """Where RabbitMQ is and how patient to be with it."""

    #: ``amqp://`` or ``amqps://`` URL with credentials and vhost, without query.
    url: str = field(repr=False)
    #: AMQP heartbeat negotiated with the broker (seconds; 0 disables).
    heartbeat_s: int = 30
    #: Limit for the first connect; a broker that does not answer in time is unreachable.
    connect_timeout_s: float = 10.0
    #: How long ``publish`` waits for the broker's confirm (ack, nack or return).
    confirm_timeout_s: float = 30.0
    #: Limit for declarations, bindings, deletes, stats, qos and consumer changes.
    operation_timeout_s: float = 10.0
    #: Pause between reconnect attempts after a lost connection (aio-pika robust).
    reconnect_interval_s: float = 2.0
    #: Shown in the management UI; the two connections get ``-pub`` and ``-con``.
    connection_name: str = "conveyor"
    #: AMQP delivery mode 2 (written to disk on durable queues) for every publish, so that
    #: what the broker confirmed survives its restart. ``?persistent=0`` in the URL or
    #: ``CONVEYOR_AMQP_PERSISTENT=0`` trade that for speed (transient messages).
    persistent: bool = True
    #: The faster byte paths through aiormq (``workers.amqp.speedups``); off = plain
    #: aio-pika/aiormq. ``?speedups=off`` in the URL, ``CONVEYOR_AMQP_SPEEDUPS=0``.
    speedups: bool = True
    #: TLS (``amqps://``): the CA bundle that signed the broker's certificate (default:
    #: the system's), this client's certificate and key (for brokers that verify peers),
    #: and whether to check the broker's certificate and that it names the URL's host.
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    verify_tls: bool = True
    #: The other nodes of the cluster (full URLs, same credentials and vhost as a rule):
    #: a lost connection reconnects to the next node (``workers.amqp.nodes``).
    other_nodes: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"AMQP URL must start with amqp:// or amqps://, got scheme {parts.scheme!r}"
            )
        if not parts.hostname:
            raise ConfigError(f"AMQP URL {self.safe_url!r} names no host")
        for name in ("connect_timeout_s", "confirm_timeout_s", "operation_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.heartbeat_s < 0 or self.reconnect_interval_s <= 0:
            raise ConfigError("heartbeat_s must be >= 0 and reconnect_interval_s > 0")
        given = [name for name in TLS_FIELDS if getattr(self, name)]
        if given and parts.scheme != "amqps":
            raise ConfigError(
                f"TLS settings {given} need an amqps:// URL, got {self.safe_url!r}"
            )
        if self.keyfile and not self.certfile:
            raise ConfigError("keyfile given without certfile; give the client certificate too")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"AMQP URL {self.safe_url!r} has a bad port") from exc
        return port or (5671 if parts.scheme == "amqps" else 5672)

    @property
    def address(self) -> str:
        """``host:port``, for error messages."""
        return f"{self.host}:{self.port}"

    @property
    def safe_url(self) -> str:
        """The URL with the password replaced by ``***``."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
            if f.name not in ("url", "other_nodes")
        )
        return f"AmqpSettings(url={self.safe_url!r}, {shown}, other_nodes={len(self.other_nodes)})"

    @classmethod
    def from_url(
        cls, url: str, *, defaults: Mapping[str, Any] | None = None, **overrides: Any
    ) -> AmqpSettings:
        """Settings from a URL; query parameters (``?heartbeat=10&name=w1``) set fields,
        over ``defaults`` (a plan's choices) and under ``overrides``."""
        parts = urlsplit(url)
        values: dict[str, Any] = {}
        for key, raw in parse_qsl(parts.query, keep_blank_values=True):
            if key not in QUERY_FIELDS:
                raise ConfigError(
                    f"unknown AMQP URL parameter {key!r}; known: {', '.join(QUERY_FIELDS)}"
                )
            values[QUERY_FIELDS[key]] = raw
        base = cls(url=urlunsplit(parts._replace(query="", fragment="")))
        return base.with_values({**(defaults or {}), **values, **overrides})

    @classmethod
    def from_url_and_env(
        cls,
        url: str,
        env: Mapping[str, str] | None = None,
        *,
        defaults: Mapping[str, Any] | None = None,
    ) -> AmqpSettings:
        """Settings from ``url``, then the optional ``CONVEYOR_AMQP_*`` variables (TLS
        files, timeouts) on top: what a process given ``--broker URL`` uses. ``defaults``
        (a plan's choices) apply below both."""
        env = os.environ if env is None else env
        values = {name: env[var] for var, name in ENV_FIELDS.items() if env.get(var)}
        return cls.from_url(url, defaults=defaults).with_values(values)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of an ``amqps://`` URL (None for ``amqp://``); ``ConfigError``
        naming the file that cannot be read."""
        if urlsplit(self.url).scheme != "amqps":
            return None
        try:
            context = ssl.create_default_context(cafile=self.cafile or None)
            if self.certfile:
                context.load_cert_chain(self.certfile, self.keyfile or None)
        except FileNotFoundError as exc:
            raise ConfigError(f"TLS file not found: {exc.filename}") from exc
        except (ssl.SSLError, OSError) as exc:
            files = ", ".join(f"{n}={getattr(self, n)}" for n in TLS_FIELDS if getattr(self, n))
            raise ConfigError(f"cannot use the TLS files ({files}): {exc}") from exc
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def with_values(self, values: Mapping[str, Any]) -> AmqpSettings:
        """A copy with fields set from strings or typed values, each checked."""
        types = {f.name: f.type for f in fields(self)}
        converted: dict[str, Any] = {}
        for name, value in values.items():
            if name not in types or name in ("url", "other_nodes"):
                raise ConfigError(f"unknown AMQP setting {name!r}")
            converted[name] = _convert(name, str(types[name]), value)
        return replace(self, **converted)

    def aio_pika_url(self, url: str | None = None) -> str:
        """The URL (or another node's) with the query aio-pika reads (heartbeat)."""
        parts = urlsplit(self.url if url is None else url)
        query = urlencode({"heartbeat": str(self.heartbeat_s)})
        return urlunsplit(parts._replace(query=query))

    def with_other_nodes(self, urls: Sequence[str]) -> AmqpSettings:
        """A copy that reconnects to ``urls`` (in turn) when its node is lost."""
        for url in urls:
            AmqpSettings(url=url)  # ConfigError for a URL that is not amqp(s)://host
        return replace(self, other_nodes=tuple(urls))


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(name: str, value: Any) -> bool:
    """``True``/``False`` from a bool or one of 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in (*_TRUE, *_FALSE):
        raise ConfigError(
            f"AMQP setting {name} expects one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}, "
            f"got {value!r}"
        )
    return text in _TRUE


def _convert(name: str, type_name: str, value: Any) -> Any:
    try:
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "bool":
            return parse_bool(name, value)
    except ValueError as exc:
        raise ConfigError(f"AMQP setting {name} expects {type_name}, got {value!r}") from exc
    return str(value)
