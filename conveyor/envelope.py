"""Request metadata <-> AMQP properties and headers (docs/wire.md, "Envelope").

The body of a request is a tensor message (``conveyor.wire``). Everything a broker or a
worker needs before it decodes the body travels beside it, so that any AMQP client in any
language can publish a request:

=====================  ==========================  ==========================================
``RequestMeta`` field  AMQP                         value
=====================  ==========================  ==========================================
``request_id``         ``message_id``               str, 1..255 UTF-8 bytes (also the reply's
                       (and ``correlation_id``)     ``correlation_id``)
``reply_to``           ``reply_to``                 queue name; replies go to exchange ``""``
``deadline``           ``x-conveyor-deadline``      unix time in seconds, sent as a decimal
                                                    string (e.g. ``"1795733439.25"``)
``plan_hash``          ``x-conveyor-plan``          ``Plan.hash``: lowercase hex, 1..64 chars
``attempt``            ``x-conveyor-attempt``       int >= 1 (always sent)
``trace_id``           ``x-conveyor-trace``         str, 1..255 UTF-8 bytes
``key``                ``x-conveyor-key``           partition key, str, 0..255 UTF-8 bytes
``packed_replies``     ``x-conveyor-replies``       ``"packed"``: the client reads reply packs
                                                    (``conveyor.packs``); absent or ``"single"``:
                                                    one reply per request
``sent``               ``x-conveyor-sent``          unix time the client sent it (decimal
                                                    string); workers measure end-to-end time
=====================  ==========================  ==========================================

``trace_id`` holds a W3C ``traceparent`` (``00-<32 hex trace id>-<16 hex parent id>-<2 hex
flags>``) when the sender follows Trace Context, as the SDK does (``conveyor.tracing``); any
other string is carried unchanged. A plain AMQP client may send the standard ``traceparent``
header instead; it is read when ``x-conveyor-trace`` is absent.

Replies carry ``x-conveyor-status`` (``"ok"`` or ``"error"``); an error reply also carries
``x-conveyor-error`` (the ``ConveyorError.code``) and a msgpack body
``{"code", "message", "stage"}``. ``read_reply`` turns it back into the typed error.

Header values are validated on the way in: a malformed one raises ``CodecError`` naming
the header. Numbers may also arrive as AMQP decimals (``Decimal``) or decimal strings
(pika cannot send a float header), and strings as UTF-8 bytes, since AMQP clients differ
in how they type table values.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import msgpack

from conveyor.errors import (
    CodecError,
    ConveyorError,
    InferenceError,
    error_from_code,
)
from conveyor.transport import HeaderValue, Message
from conveyor.wire import DEFAULT_LIMITS, Decoded, Limits, decode

HEADER_DEADLINE = "x-conveyor-deadline"
HEADER_PLAN = "x-conveyor-plan"
HEADER_ATTEMPT = "x-conveyor-attempt"
HEADER_TRACE = "x-conveyor-trace"
HEADER_KEY = "x-conveyor-key"
HEADER_REPLIES = "x-conveyor-replies"
HEADER_SENT = "x-conveyor-sent"
#: The W3C Trace Context header name (read when ``x-conveyor-trace`` is absent).
HEADER_TRACEPARENT = "traceparent"
HEADER_STATUS = "x-conveyor-status"
HEADER_ERROR = "x-conveyor-error"

STATUS_OK = "ok"
STATUS_ERROR = "error"
REPLIES_PACKED = "packed"
REPLIES_SINGLE = "single"
CONTENT_TYPE = "application/msgpack"

#: AMQP short strings (message_id, reply_to, routing keys) hold at most 255 bytes.
MAX_SHORT_STR = 255
#: Attempts beyond this are certainly a malformed header, not a retry count.
MAX_ATTEMPT = 1_000_000
#: An error reply body larger than this is refused before it is unpacked.
MAX_ERROR_BODY = 64 * 1024
#: Characters of an error's text sent in a reply (at most 4 UTF-8 bytes each: fits above).
MAX_ERROR_TEXT = 8 * 1024

_PLAN_HASH = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class RequestMeta:
    """What a worker needs to know about a request besides its tensors."""

    request_id: str
    reply_to: str | None = None
    deadline: float | None = None
    plan_hash: str | None = None
    attempt: int = 1
    trace_id: str | None = None
    key: str | None = None
    #: The client reads reply packs (several answers in one message, ``conveyor.packs``).
    packed_replies: bool = False
    #: Unix time the client sent the request (end-to-end latency at the last stage).
    sent: float | None = None

    def __post_init__(self) -> None:
        _check_short_str("request_id", self.request_id, allow_empty=False)
        if self.reply_to is not None:
            _check_short_str("reply_to", self.reply_to, allow_empty=False)
        if self.deadline is not None:
            object.__setattr__(self, "deadline", _number("deadline", self.deadline))
        if self.plan_hash is not None:
            _check_plan_hash("plan_hash", self.plan_hash)
        _attempt("attempt", self.attempt)
        if self.trace_id is not None:
            _check_short_str("trace_id", self.trace_id, allow_empty=False)
        if self.key is not None:
            _check_short_str("key", self.key, allow_empty=True)
        if not isinstance(self.packed_replies, bool):
            raise CodecError(f"packed_replies must be a bool, got {self.packed_replies!r:.40}")
        if self.sent is not None:
            object.__setattr__(self, "sent", _number("sent", self.sent))

    def headers(self) -> dict[str, HeaderValue]:
        """The ``x-conveyor-*`` headers of this request (unset fields are left out)."""
        h: dict[str, HeaderValue] = {HEADER_ATTEMPT: self.attempt}
        if self.deadline is not None:
            # A string, not a float: pamqp (under aio-pika) writes a Python float as a 32-bit
            # float, which rounds a unix time by up to 64 s; pika cannot send a float at
            # all. repr() round-trips exactly and from_message reads it back as a number.
            h[HEADER_DEADLINE] = repr(self.deadline)
        if self.plan_hash is not None:
            h[HEADER_PLAN] = self.plan_hash
        if self.trace_id is not None:
            h[HEADER_TRACE] = self.trace_id
        if self.key is not None:
            h[HEADER_KEY] = self.key
        if self.packed_replies:
            h[HEADER_REPLIES] = REPLIES_PACKED
        if self.sent is not None:
            h[HEADER_SENT] = repr(self.sent)
        return h

    def to_message(self, body: bytes) -> Message:
        return Message(
            body=body,
            headers=self.headers(),
            content_type=CONTENT_TYPE,
            message_id=self.request_id,
            correlation_id=self.request_id,
            reply_to=self.reply_to,
        )

    @classmethod
    def trusted(
        cls,
        request_id: str,
        reply_to: str | None,
        deadline: float | None,
        plan_hash: str | None,
        packed_replies: bool,
        attempt: int = 1,
        trace_id: str | None = None,
        key: str | None = None,
        sent: float | None = None,
    ) -> RequestMeta:
        """A request's meta from fields the caller has already checked (hot paths: the
        client's own ids with a reply queue and plan hash checked once; pack entries that
        ``plain_entry`` vouched for)."""
        meta = object.__new__(cls)
        for name, value in (
            ("request_id", request_id),
            ("reply_to", reply_to),
            ("deadline", deadline),
            ("plan_hash", plan_hash),
            ("attempt", attempt),
            ("trace_id", trace_id),
            ("key", key),
            ("packed_replies", packed_replies),
            ("sent", sent),
        ):
            object.__setattr__(meta, name, value)
        return meta

    @classmethod
    def from_message(cls, message: Message) -> RequestMeta:
        """Read a request's metadata; ``CodecError`` naming the first malformed header."""
        raw_id = message.message_id if message.message_id is not None else message.correlation_id
        if raw_id is None:
            raise CodecError("request has neither message_id nor correlation_id (the request id)")
        h = message.headers
        deadline = _header(h, HEADER_DEADLINE)
        plan = _header(h, HEADER_PLAN)
        attempt = _header(h, HEADER_ATTEMPT)
        trace = _header(h, HEADER_TRACE)
        if trace is None:
            trace = _header(h, HEADER_TRACEPARENT)
        sent = _header(h, HEADER_SENT)
        key = _header(h, HEADER_KEY)
        replies = _header(h, HEADER_REPLIES)
        # Each field is checked as it is read: build without __post_init__'s second pass.
        meta = object.__new__(cls)
        for name, value in (
            ("request_id", _short_str("message_id", raw_id, allow_empty=False)),
            (
                "reply_to",
                None
                if message.reply_to is None
                else _short_str("reply_to", message.reply_to, allow_empty=False),
            ),
            ("deadline", None if deadline is None else _number(HEADER_DEADLINE, deadline)),
            ("plan_hash", None if plan is None else _plan_hash(HEADER_PLAN, plan)),
            ("attempt", 1 if attempt is None else _attempt(HEADER_ATTEMPT, attempt)),
            (
                "trace_id",
                None if trace is None else _short_str(HEADER_TRACE, trace, allow_empty=False),
            ),
            ("key", None if key is None else _short_str(HEADER_KEY, key, allow_empty=True)),
            ("packed_replies", False if replies is None else _replies(replies)),
            ("sent", None if sent is None else _number(HEADER_SENT, sent)),
        ):
            object.__setattr__(meta, name, value)
        return meta

    def expired(self, now: float | None = None) -> bool:
        """True when the deadline has passed (never for a request without one)."""
        if self.deadline is None:
            return False
        return (time.time() if now is None else now) >= self.deadline


def reply_ok(meta: RequestMeta, body: bytes) -> Message:
    """The reply carrying a stage's output tensors (``body`` from ``wire.encode``)."""
    return Message(
        body=body,
        headers=_reply_headers(meta, STATUS_OK),
        content_type=CONTENT_TYPE,
        correlation_id=meta.request_id,
    )


def reply_error(meta: RequestMeta, error: ConveyorError) -> Message:
    """The reply telling the caller why its request failed; ``read_reply`` re-raises it."""
    stage = getattr(error, "stage", None)
    text = str(error)
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + " ... (truncated)"
    body: dict[str, str | None] = {
        "code": error.code,
        "message": text,
        "stage": stage if isinstance(stage, str) else None,
    }
    headers = _reply_headers(meta, STATUS_ERROR)
    headers[HEADER_ERROR] = error.code
    return Message(
        body=msgpack.packb(body),
        headers=headers,
        content_type=CONTENT_TYPE,
        correlation_id=meta.request_id,
    )


def read_reply(message: Message, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Decode an ok reply; raise the typed error an error reply carries.

    Raises ``CodecError`` for a reply that is neither a valid ok reply nor an error reply.
    """
    status = _header(message.headers, HEADER_STATUS)
    status_str = None if status is None else _short_str(HEADER_STATUS, status, allow_empty=True)
    if status_str == STATUS_OK:
        return decode(message.body, limits)
    if status_str == STATUS_ERROR:
        raise _error_of(message)
    raise CodecError(
        f"reply header {HEADER_STATUS} is {status!r}; expected {STATUS_OK!r} or {STATUS_ERROR!r}"
    )


# -- error replies ---------------------------------------------------------------------------


def _error_of(message: Message) -> ConveyorError:
    header_code = _header(message.headers, HEADER_ERROR)
    try:
        fields = _error_body(message.body)
    except CodecError:
        if header_code is None:
            raise
        fields = {}  # the header still says which error it was
    code = fields.get("code")
    if not isinstance(code, str):
        if header_code is None:
            raise CodecError(
                f"error reply has no error code (neither body 'code' nor header {HEADER_ERROR})"
            )
        code = _short_str(HEADER_ERROR, header_code, allow_empty=False)
    text = fields.get("message")
    error = error_from_code(code, text if isinstance(text, str) else f"remote error {code!r}")
    stage = fields.get("stage")
    if isinstance(error, InferenceError) and isinstance(stage, str):
        error.stage = stage
    return error


def _error_body(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_ERROR_BODY:
        raise CodecError(f"error reply body is {len(body)} bytes; the limit is {MAX_ERROR_BODY}")
    try:
        fields = msgpack.unpackb(
            body,
            strict_map_key=True,
            max_str_len=MAX_ERROR_BODY,
            max_bin_len=MAX_ERROR_BODY,
            max_array_len=1024,
            max_map_len=64,
            max_ext_len=0,
        )
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as exc:
        raise CodecError(
            f"error reply body is not valid msgpack: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(fields, dict):
        raise CodecError(f"error reply body is a {type(fields).__name__}; expected a map")
    return fields


def _reply_headers(meta: RequestMeta, status: str) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {HEADER_STATUS: status}
    if meta.trace_id is not None:
        headers[HEADER_TRACE] = meta.trace_id
    return headers


# -- header values ---------------------------------------------------------------------------


def _header(headers: Mapping[str, HeaderValue], name: str) -> object:
    try:
        return headers.get(name)
    except (AttributeError, TypeError) as exc:
        raise CodecError(f"message headers are a {type(headers).__name__}, not a table") from exc


def _short_str(name: str, value: object, *, allow_empty: bool) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"{name} is not valid UTF-8: {exc}") from exc
    if not isinstance(value, str):
        raise CodecError(f"{name} must be a string, got {type(value).__name__} {value!r:.80}")
    _check_short_str(name, value, allow_empty=allow_empty)
    return value


def _check_short_str(name: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise CodecError(f"{name} must be a string, got {type(value).__name__} {value!r:.80}")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise CodecError(f"{name} is not encodable as UTF-8: {exc}") from exc
    if size > MAX_SHORT_STR:
        raise CodecError(f"{name} is {size} bytes long; at most {MAX_SHORT_STR} are allowed")
    if size == 0 and not allow_empty:
        raise CodecError(f"{name} must not be empty")


def _number(name: str, value: object) -> float:
    if isinstance(value, bytes | bytearray | str):
        text = _short_str(name, value, allow_empty=False)
        try:
            value = float(text)
        except ValueError as exc:
            raise CodecError(f"{name} must be a number, got {text!r:.80}") from exc
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise CodecError(f"{name} must be a number, got {type(value).__name__} {value!r:.80}")
    try:
        number = float(value)
    except (OverflowError, ValueError) as exc:
        raise CodecError(f"{name} is out of range: {value!r:.80}") from exc
    if not math.isfinite(number):
        raise CodecError(f"{name} must be finite, got {number!r}")
    return number


def _attempt(name: str, value: object) -> int:
    if isinstance(value, bytes | bytearray | str):
        text = _short_str(name, value, allow_empty=False)
        if not text.isascii() or not text.isdigit():
            raise CodecError(f"{name} must be a positive integer, got {text!r:.80}")
        value = int(text) if len(text) <= 12 else MAX_ATTEMPT + 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise CodecError(f"{name} must be an integer, got {type(value).__name__} {value!r:.80}")
    if not 1 <= value <= MAX_ATTEMPT:
        raise CodecError(f"{name} must be between 1 and {MAX_ATTEMPT}, got {value}")
    return value


def _replies(value: object) -> bool:
    text = _short_str(HEADER_REPLIES, value, allow_empty=False)
    if text not in (REPLIES_PACKED, REPLIES_SINGLE):
        raise CodecError(
            f"{HEADER_REPLIES} must be {REPLIES_PACKED!r} or {REPLIES_SINGLE!r}, got {text!r:.80}"
        )
    return text == REPLIES_PACKED


def plain_entry(
    request_id: object,
    reply_to: object,
    deadline: object,
    attempt: object,
    trace_id: object,
    key: object,
    sent: object = None,
) -> bool:
    """True when these decoded fields certainly pass ``RequestMeta``'s checks: exact types,
    strings short enough (an ASCII string's length is its UTF-8 size; 63 characters of
    any kind are at most 252 bytes; msgpack strings are valid UTF-8), a finite deadline and
    an attempt in range. False only means "check them the slow way", which also says
    what is wrong."""
    return (
        _plain_str(request_id, 1)
        and (reply_to is None or _plain_str(reply_to, 1))
        and (deadline is None or (type(deadline) is float and math.isfinite(deadline)))
        and type(attempt) is int
        and 1 <= attempt <= MAX_ATTEMPT
        and (trace_id is None or _plain_str(trace_id, 1))
        and (key is None or _plain_str(key, 0))
        and (sent is None or (type(sent) is float and math.isfinite(sent)))
    )


def _plain_str(value: object, least: int) -> bool:
    if type(value) is not str:
        return False
    size = len(value)
    return least <= size and (size <= 63 or (size <= MAX_SHORT_STR and value.isascii()))


def _plan_hash(name: str, value: object) -> str:
    text = _short_str(name, value, allow_empty=False)
    _check_plan_hash(name, text)
    return text


def _check_plan_hash(name: str, value: object) -> None:
    if not isinstance(value, str) or _PLAN_HASH.fullmatch(value) is None:
        raise CodecError(f"{name} must be 1 to 64 lowercase hex digits, got {value!r:.80}")
