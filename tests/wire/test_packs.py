"""Request packs and reply packs (conveyor.packs, docs/wire.md "Packs")."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor import wire
from conveyor.envelope import HEADER_REPLIES, RequestMeta, read_reply
from conveyor.errors import CodecError
from conveyor.packs import (
    REPLY_PACK_TYPE,
    REQUEST_PACK_TYPE,
    encode_stage_message,
    pack_replies,
    pack_requests,
    request_rows,
    unpack_replies,
    unpack_requests,
)
from conveyor.transport import Message

PLAN = "ab" * 32


def meta(i: int, **kw: object) -> RequestMeta:
    return RequestMeta(f"r{i}", reply_to="q", deadline=1e9 + i, plan_hash=PLAN, **kw)  # type: ignore[arg-type]


def test_a_request_pack_round_trips_each_request_with_its_own_rows_and_meta() -> None:
    xs = [np.full((n, 3), n, np.float32) for n in (1, 3, 2)]
    ids = [np.arange(n, dtype=np.int64) for n in (1, 3, 2)]
    metas = [meta(0, key="k0"), meta(1, trace_id="t1", packed_replies=True), meta(2)]
    requests = [(m, {"x": x, "i": i}) for m, x, i in zip(metas, xs, ids, strict=True)]
    message = pack_requests(PLAN, requests)
    assert message.type == REQUEST_PACK_TYPE
    # The envelope names the first request, for broker tools.
    assert message.message_id == "r0" and message.reply_to == "q"
    got = unpack_requests(message)
    assert [m for m, _ in got] == metas
    for (_, tensors), x, i in zip(got, xs, ids, strict=True):
        np.testing.assert_array_equal(tensors["x"], x)
        np.testing.assert_array_equal(tensors["i"], i)


def test_a_plain_request_unpacks_as_itself() -> None:
    m = meta(7, packed_replies=True)
    message = m.to_message(wire.encode({"x": np.ones((1, 2), np.float32)}))
    assert message.headers[HEADER_REPLIES] == "packed"
    [(got, tensors)] = unpack_requests(message)
    assert got == m and tensors["x"].shape == (1, 2)


def test_a_pack_must_come_from_a_client() -> None:
    forged = encode_stage_message(
        PLAN, "stage0", [(meta(0), 1)], {"x": np.ones((1, 2), np.float32)},
        message_type=REQUEST_PACK_TYPE,
    )
    with pytest.raises(CodecError, match="@client"):
        unpack_requests(forged)


def test_a_pack_whose_rows_do_not_add_up_is_refused() -> None:
    message = encode_stage_message(
        PLAN, "@client", [(meta(0), 1), (meta(1), 1)], {"x": np.ones((3, 2), np.float32)},
        message_type=REQUEST_PACK_TYPE,
    )
    with pytest.raises(CodecError, match="hold 2 rows"):
        unpack_requests(message)


def test_a_reply_pack_gives_each_request_its_rows() -> None:
    y = np.arange(12, dtype=np.float32).reshape(6, 2)
    message = pack_replies([("a", 1), ("b", 3), ("c", 2)], {"y": y})
    assert message.type == REPLY_PACK_TYPE and message.correlation_id == "a"
    read_reply(message)  # an ok reply as far as status goes
    got = dict(unpack_replies(message))
    np.testing.assert_array_equal(got["a"]["y"], y[:1])
    np.testing.assert_array_equal(got["b"]["y"], y[1:4])
    np.testing.assert_array_equal(got["c"]["y"], y[4:])


@pytest.mark.parametrize(
    ("meta_value", "match"),
    [
        ({"kind": "stage", "requests": [{"id": "a", "rows": 1}]}, "not a reply pack"),
        ({"kind": "replies", "requests": []}, "non-empty"),
        ({"kind": "replies", "requests": [{"rows": 1}]}, "str 'id'"),
        ({"kind": "replies", "requests": [{"id": "a", "rows": -1}]}, "rows"),
        ({"kind": "replies", "requests": [{"id": "a", "rows": 2}]}, "hold 2 rows"),
    ],
)
def test_a_malformed_reply_pack_raises_codec_error(meta_value: dict, match: str) -> None:  # type: ignore[type-arg]
    body = wire.encode({"y": np.ones((1, 2), np.float32)}, meta_value)
    with pytest.raises(CodecError, match=match):
        unpack_replies(Message(body=body, type=REPLY_PACK_TYPE))


@pytest.mark.parametrize(
    ("value", "packed"), [("packed", True), ("single", False), (b"packed", True)]
)
def test_the_replies_header_says_whether_the_client_reads_packs(
    value: object, packed: bool
) -> None:
    message = Message(body=b"", message_id="r", headers={HEADER_REPLIES: value})  # type: ignore[dict-item]
    assert RequestMeta.from_message(message).packed_replies is packed


def test_an_unknown_replies_header_is_a_codec_error() -> None:
    message = Message(body=b"", message_id="r", headers={HEADER_REPLIES: "bundled"})
    with pytest.raises(CodecError, match="x-conveyor-replies"):
        RequestMeta.from_message(message)


GOOD = {"id": "r", "reply_to": "q", "deadline": 1e9, "attempt": 1, "rows": 1}


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("id", "", "must not be empty"),
        ("id", "x" * 256, "255"),
        ("id", 7, "must be a string"),
        ("reply_to", "y" * 300, "255"),
        ("reply_to", "\u00e9" * 128, "255"),  # 128 characters, 256 UTF-8 bytes
        ("deadline", float("inf"), "finite"),
        ("deadline", "soon", "number"),
        ("attempt", 0, "between 1"),
        ("attempt", True, "integer"),
        ("trace", "", "must not be empty"),
        ("key", "k" * 256, "255"),
    ],
)
def test_every_entry_of_a_pack_is_checked_like_the_first(
    field: str, value: object, match: str
) -> None:
    from conveyor.packs import read_request_entries

    bad = {**GOOD, field: value}
    for entries in ([bad], [GOOD, bad], [GOOD, GOOD, bad]):
        with pytest.raises(CodecError, match=match):
            read_request_entries(entries, PLAN)


def test_entries_read_fast_equal_those_read_the_slow_way() -> None:
    from conveyor.packs import read_request_entries

    long_queue = "conveyor." + "a" * 16 + ".reply." + "f" * 32  # 64 characters, as clients'
    entries = [
        {**GOOD, "id": f"r{i}", "trace": "t", "key": "", "packed": True, "deadline": 1e9 + i,
         "reply_to": long_queue}
        for i in range(3)
    ]
    got = read_request_entries(entries, PLAN)
    for (m, rows), e in zip(got, entries, strict=True):
        assert rows == 1
        assert m == RequestMeta(
            e["id"], reply_to=long_queue, deadline=e["deadline"], plan_hash=PLAN, attempt=1,
            trace_id="t", key="", packed_replies=True,
        )
    with pytest.raises(CodecError, match="plan_hash"):
        read_request_entries([GOOD, GOOD], "NOT-HEX")


def test_request_rows_needs_agreeing_inputs() -> None:
    assert request_rows({"a": np.zeros((3, 2)), "b": np.zeros((3,)), "s": np.float32(1)}) == 3
    assert request_rows({"s": np.zeros(())}) == 1
    with pytest.raises(CodecError, match="disagree"):
        request_rows({"a": np.zeros((3, 2)), "b": np.zeros((2, 2))})
