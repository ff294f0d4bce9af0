"""The gate of the faster byte paths through aiormq: whether a transport uses them, and why.

Three pieces make large messages cheap (docs/operations.md, "RabbitMQ connections"):

* ``writer.CoalescingConnection``: one socket write per event-loop turn. It plugs in
  through aiormq's ``transport_factory`` (a public parameter), but the reader it hands
  aiormq is ``reader.FrameStream``;
* ``reader.FrameStream``: a ``BufferedProtocol`` that stands in for the
  ``asyncio.StreamReader`` aiormq reads from. It relies on which reader methods aiormq
  calls and on ``asyncio.StreamWriter``'s private ``_get_close_waiter`` hook;
* ``frames``: replaces three private pieces of aiormq for the whole process
  (``Channel._split_body``, ``ChannelFrame.marshall``, the module global
  ``aiormq.connection.FrameReceiver``).

All three depend on aiormq's (or asyncio's) private internals, so one switch covers
them all. When it is off, the transport opens aio-pika's own ``RobustConnection`` and
aiormq is left untouched: the plain aio-pika/aiormq path, end to end.

They are used only when all of these hold (``decide``):

* ``CONVEYOR_AMQP_SPEEDUPS`` is not off (``0``/``false``/``no``/``off``). It is read at
  every connect and applies to every transport of the process (the framing is
  process-wide anyway); ``AmqpSettings.from_url_and_env`` also reads it into the field;
* the transport's ``AmqpSettings.speedups`` is true (``?speedups=off`` in the URL);
* the installed aiormq (``importlib.metadata``) is one of ``TESTED_AIORMQ``, the versions
  the replacements were tested against;
* aiormq has the three replaced pieces, still as ``frames`` found them at import.

The framing replacements are installed by the first connect of a transport that uses the
speedups and then stay. A later transport with ``?speedups=off`` in the same process gets
the plain reader and writer, but its channels frame through the replacements (the same
bytes); the log says so. The environment variable keeps a whole process plain. Each
decision is logged once, at INFO.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import aio_pika
import aiormq.abc
import aiormq.channel
import aiormq.connection
from aio_pika.abc import AbstractRobustConnection

from workers.amqp import frames
from workers.amqp.settings import parse_bool
from workers.amqp.writer import CoalescingConnection

log = logging.getLogger(__name__)

ENV_SWITCH = "CONVEYOR_AMQP_SPEEDUPS"
#: aiormq versions the replacements were tested against (tests/amqp, both CI runs).
#: Add a version here only after tests/amqp and tests/transport pass on it.
TESTED_AIORMQ = frozenset({"7.2.4"})

_logged: set[str] = set()


@dataclass(frozen=True)
class Decision:
    on: bool
    #: Why, for the log: "off by setting ...", "untested aiormq version ...", "on ...".
    reason: str


@cache
def aiormq_version() -> str:
    return importlib.metadata.version("aiormq")


# -- the three replaced pieces ---------------------------------------------------------


def _unwrap(value: Any) -> Any:
    return value.__func__ if isinstance(value, classmethod) else value


@dataclass(frozen=True)
class _Piece:
    """One replaced piece of aiormq: where it lives, aiormq's own, ours."""

    name: str
    owner: Any  # the class or module that holds it
    attribute: str
    #: aiormq's own, as ``frames`` found it at import (None where this aiormq lacks it)
    original: Any
    replacement: Any
    #: what aiormq's own must look like for the replacement to fit
    shaped: Callable[[Any], bool]

    def current(self) -> Any:
        return vars(self.owner).get(self.attribute)

    def is_ours(self) -> bool:
        return _unwrap(self.current()) is _unwrap(self.replacement)

    def fits(self) -> bool:
        """Ours already, or aiormq's own in the expected shape and not changed since."""
        if self.is_ours():
            return True
        original = self.original
        return original is not None and self.shaped(original) and self.current() is original


_PIECES = (
    _Piece("Channel._split_body", aiormq.channel.Channel, "_split_body",
           frames.ORIGINAL_SPLIT_BODY, frames.split_body, callable),
    _Piece("ChannelFrame.marshall", aiormq.abc.ChannelFrame, "marshall",
           frames.ORIGINAL_MARSHALL, classmethod(frames.marshall),
           lambda p: isinstance(p, classmethod)),
    _Piece("aiormq.connection.FrameReceiver", aiormq.connection, "FrameReceiver",
           frames.ORIGINAL_RECEIVER, frames.BodyJoiningReceiver,
           lambda p: isinstance(p, type) and hasattr(p, "get_frame")),
)


def unfit_pieces() -> list[str]:
    """The replaced pieces this aiormq lacks, or has in another shape, or someone changed."""
    return [piece.name for piece in _PIECES if not piece.fits()]


def installed() -> bool:
    """Whether all three framing replacements are in place (the live aiormq, not a flag)."""
    return all(piece.is_ours() for piece in _PIECES)


def untouched() -> bool:
    """Whether all three pieces are aiormq's own, as imported."""
    return all(piece.current() is piece.original for piece in _PIECES)


def install_framing() -> None:
    """Put the three replacements in place (idempotent). Only after ``decide`` said on."""
    for piece in _PIECES:
        setattr(piece.owner, piece.attribute, piece.replacement)


# -- the decision ----------------------------------------------------------------------


def decide(requested: bool, env: Mapping[str, str] | None = None) -> Decision:
    """Whether a transport whose ``AmqpSettings.speedups`` is ``requested`` uses them."""
    env = os.environ if env is None else env
    raw = env.get(ENV_SWITCH, "")
    if raw and not parse_bool(ENV_SWITCH, raw):
        return Decision(False, f"off by setting ({ENV_SWITCH}={raw})")
    if not requested:
        return Decision(False, "off by setting (AmqpSettings.speedups, ?speedups=off)")
    version = aiormq_version()
    if version not in TESTED_AIORMQ:
        tested = ", ".join(sorted(TESTED_AIORMQ))
        return Decision(False, f"untested aiormq version {version} (tested: {tested})")
    unfit = unfit_pieces()
    if unfit:
        return Decision(
            False, f"aiormq {version} lacks or changed {', '.join(unfit)}, which they replace"
        )
    return Decision(True, f"on (aiormq {version})")


def connection_class(requested: bool) -> type[AbstractRobustConnection]:
    """The aio-pika connection class for a transport; installs the framing when on."""
    decision = decide(requested)
    if decision.on:
        install_framing()
        _log_once(
            f"RabbitMQ byte paths: speedups {decision.reason}: coalesced writes, "
            "FrameStream reads, aiormq framing replaced"
        )
        return CoalescingConnection
    note = ""
    if installed():
        note = (
            "; aiormq's framing stays replaced in this process (an earlier transport "
            f"installed it; {ENV_SWITCH}=0 keeps a whole process plain)"
        )
    _log_once(f"RabbitMQ byte paths: speedups {decision.reason}: plain aio-pika/aiormq{note}")
    return aio_pika.RobustConnection


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info("%s", message)
