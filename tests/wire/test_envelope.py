"""conveyor.envelope: request metadata as AMQP properties and headers, replies and errors."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import msgpack
import numpy as np
import pytest

from conveyor import envelope
from conveyor.envelope import RequestMeta, read_reply, reply_error, reply_ok
from conveyor.errors import (
    BackpressureError,
    CodecError,
    ConfigError,
    ConveyorError,
    DeadlineExceeded,
    InferenceError,
    PlanError,
    PlanHashMismatch,
    RemoteError,
    TransportError,
    UnroutableError,
)
from conveyor.transport import Message
from conveyor.wire import encode

PLAN = "0123456789abcdef" * 4
FULL = RequestMeta(
    request_id="req-1",
    reply_to="amq.gen-reply",
    deadline=1_800_000_000.25,
    plan_hash=PLAN,
    attempt=3,
    trace_id="trace-9",
    key="user-42",
)


def test_header_names_are_the_documented_contract() -> None:
    # Clients in other languages set these literally (docs/wire.md); they must not drift.
    msg = FULL.to_message(b"")
    assert dict(msg.headers) == {
        "x-conveyor-deadline": repr(FULL.deadline),
        "x-conveyor-plan": PLAN,
        "x-conveyor-attempt": 3,
        "x-conveyor-trace": "trace-9",
        "x-conveyor-key": "user-42",
    }
    assert (msg.message_id, msg.correlation_id, msg.reply_to) == ("req-1", "req-1", FULL.reply_to)
    assert msg.content_type == "application/msgpack"


@pytest.mark.parametrize("meta", [FULL, RequestMeta("only-id"), replace(FULL, key="")])
def test_round_trip(meta: RequestMeta) -> None:
    body = encode({"x": np.ones(2)})
    msg = meta.to_message(body)
    assert msg.body is body
    assert RequestMeta.from_message(msg) == meta


def test_minimal_request_sends_only_the_attempt_header() -> None:
    msg = RequestMeta("r").to_message(b"")
    assert dict(msg.headers) == {envelope.HEADER_ATTEMPT: 1}
    assert msg.reply_to is None


def test_values_typed_differently_by_other_clients_are_accepted() -> None:
    msg = Message(
        body=b"",
        message_id="r",
        headers={
            envelope.HEADER_DEADLINE: "1800000000.5",
            envelope.HEADER_ATTEMPT: b"2",
            envelope.HEADER_PLAN: PLAN.encode(),
            envelope.HEADER_TRACE: b"t",
            envelope.HEADER_KEY: "k",
        },
    )
    meta = RequestMeta.from_message(msg)
    assert (meta.deadline, meta.attempt, meta.plan_hash, meta.trace_id) == (
        1_800_000_000.5, 2, PLAN, "t"
    )


@pytest.mark.parametrize("value", [1_800_000_000, Decimal("1800000000"), "1800000000"])
def test_integer_and_decimal_deadlines_are_floats(value: object) -> None:
    # pika cannot send floats; AMQP decimals and strings carry the deadline instead.
    meta = RequestMeta.from_message(Message(b"", message_id="r",
                                            headers={envelope.HEADER_DEADLINE: value}))
    assert meta.deadline == 1_800_000_000.0
    assert isinstance(meta.deadline, float)


def test_correlation_id_stands_in_for_a_missing_message_id() -> None:
    assert RequestMeta.from_message(Message(b"", correlation_id="c")).request_id == "c"


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("x-conveyor-deadline", "soon"),
        ("x-conveyor-deadline", float("nan")),
        ("x-conveyor-deadline", float("inf")),
        ("x-conveyor-deadline", "inf"),
        ("x-conveyor-deadline", True),
        ("x-conveyor-deadline", 10**400),
        ("x-conveyor-deadline", Decimal("NaN")),
        ("x-conveyor-deadline", Decimal("sNaN")),
        ("x-conveyor-plan", "XYZ"),
        ("x-conveyor-plan", PLAN.upper()),
        ("x-conveyor-plan", PLAN + "0"),
        ("x-conveyor-plan", ""),
        ("x-conveyor-plan", 5),
        ("x-conveyor-attempt", 0),
        ("x-conveyor-attempt", -1),
        ("x-conveyor-attempt", 1.5),
        ("x-conveyor-attempt", True),
        ("x-conveyor-attempt", "two"),
        ("x-conveyor-attempt", "9" * 40),
        ("x-conveyor-attempt", 10**9),
        ("x-conveyor-trace", ""),
        ("x-conveyor-trace", "t" * 256),
        ("x-conveyor-trace", b"\xff\xfe"),
        ("x-conveyor-trace", 5),
        ("x-conveyor-key", 5),
        ("x-conveyor-key", "k" * 256),
    ],
)
def test_malformed_header_raises_codec_error_naming_it(header: str, value: Any) -> None:
    msg = Message(b"", message_id="r", headers={header: value})
    with pytest.raises(CodecError, match=header):
        RequestMeta.from_message(msg)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"message_id": None}, "neither message_id nor correlation_id"),
        ({"message_id": ""}, "message_id must not be empty"),
        ({"message_id": "m" * 256}, "message_id is 256 bytes"),
        ({"reply_to": "q" * 300}, "reply_to is 300 bytes"),
        ({"reply_to": ""}, "reply_to must not be empty"),
    ],
)
def test_malformed_properties_raise_codec_error_naming_them(
    fields: dict[str, Any], match: str
) -> None:
    msg = Message(**{"body": b"", "message_id": "r", **fields})
    with pytest.raises(CodecError, match=match):
        RequestMeta.from_message(msg)


def test_headers_that_are_not_a_table() -> None:
    msg = Message(b"", message_id="r", headers=[("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="message headers are a list"):
        RequestMeta.from_message(msg)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"request_id": ""}, "request_id must not be empty"),
        ({"attempt": 0}, "attempt must be between 1"),
        ({"plan_hash": "nothex"}, "plan_hash must be 1 to 64 lowercase hex"),
        ({"deadline": float("nan")}, "deadline must be finite"),
        ({"trace_id": 3}, "trace_id must be a string"),
    ],
)
def test_request_meta_refuses_bad_fields(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        replace(FULL, **fields)


def test_expired() -> None:
    assert not RequestMeta("r").expired()
    meta = replace(FULL, deadline=100.0)
    assert not meta.expired(now=99.9)
    assert meta.expired(now=100.0)
    assert meta.expired()  # 1970 is long past


# -- replies ----------------------------------------------------------------------------


def test_ok_reply_decodes_to_the_tensors() -> None:
    out = np.arange(6, dtype=np.float32).reshape(2, 3)
    msg = reply_ok(FULL, encode({"y": out}))
    assert msg.correlation_id == FULL.request_id
    assert msg.headers[envelope.HEADER_STATUS] == "ok"
    assert msg.headers[envelope.HEADER_TRACE] == FULL.trace_id
    np.testing.assert_array_equal(read_reply(msg).tensors["y"], out)


def test_ok_reply_with_a_bad_body_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="message is an empty array"):
        read_reply(reply_ok(FULL, msgpack.packb([])))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (CodecError("tensor 'x' is bad"), CodecError),
        (InferenceError("ORT failed", stage="s2"), InferenceError),
        (DeadlineExceeded("too late"), DeadlineExceeded),
        (BackpressureError("queue full", queue="q"), BackpressureError),
        (ConfigError("bad"), ConfigError),
        (TransportError("broken"), TransportError),
        (PlanHashMismatch("a" * 64, "b" * 64), PlanError),
        (UnroutableError("ex", "rk"), TransportError),
        (ConveyorError("generic"), ConveyorError),
    ],
)
def test_error_reply_raises_the_same_error_class(
    error: ConveyorError, expected: type[ConveyorError]
) -> None:
    msg = reply_error(FULL, error)
    assert msg.headers[envelope.HEADER_STATUS] == "error"
    assert msg.headers[envelope.HEADER_ERROR] == error.code
    assert msg.correlation_id == FULL.request_id
    with pytest.raises(ConveyorError) as info:
        read_reply(msg)
    assert type(info.value) is expected
    assert str(info.value) == str(error)


def test_error_reply_keeps_the_inference_stage() -> None:
    with pytest.raises(InferenceError) as info:
        read_reply(reply_error(FULL, InferenceError("boom", stage="s3")))
    assert info.value.stage == "s3"


def test_a_huge_error_text_is_truncated_but_still_typed() -> None:
    with pytest.raises(InferenceError) as info:
        read_reply(reply_error(FULL, InferenceError("\u00e9" * 100_000, stage="s")))
    assert str(info.value).endswith("(truncated)")
    assert str(info.value).startswith("\u00e9" * envelope.MAX_ERROR_TEXT)


def test_error_body_is_plain_msgpack() -> None:
    body = msgpack.unpackb(reply_error(FULL, InferenceError("boom", stage="s3")).body)
    assert body == {"code": "inference_error", "message": "boom", "stage": "s3"}


def error_message(body: bytes, **headers: Any) -> Message:
    return Message(body, headers={envelope.HEADER_STATUS: "error", **headers})


def test_unknown_error_code_becomes_remote_error() -> None:
    body = msgpack.packb({"code": "martian", "message": "from mars", "stage": None})
    with pytest.raises(RemoteError, match="from mars"):
        read_reply(error_message(body))


def test_unreadable_error_body_falls_back_to_the_header_code() -> None:
    with pytest.raises(DeadlineExceeded, match="remote error 'deadline_exceeded'"):
        read_reply(error_message(b"\xc1", **{envelope.HEADER_ERROR: "deadline_exceeded"}))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"\xc1", "error reply body is not valid msgpack"),
        (msgpack.packb([1]), "error reply body is a list; expected a map"),
        (msgpack.packb({"message": "m"}), "error reply has no error code"),
        (b"\x00" * (envelope.MAX_ERROR_BODY + 1), "error reply body is 65537 bytes"),
    ],
)
def test_malformed_error_reply_is_a_codec_error(body: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        read_reply(error_message(body))


@pytest.mark.parametrize("status", [None, "maybe", 1])
def test_reply_without_a_known_status_is_a_codec_error(status: Any) -> None:
    headers = {} if status is None else {envelope.HEADER_STATUS: status}
    with pytest.raises(CodecError, match="x-conveyor-status"):
        read_reply(Message(encode({}), headers=headers))
