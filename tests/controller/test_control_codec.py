"""The control-plane messages: round trips, and every malformed body is a CodecError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.control import (
    Command,
    CommandKind,
    CommandResult,
    Heartbeat,
    PartitionMap,
    QueueConsumption,
    StageStats,
    WorkerStats,
    decode_command,
    decode_heartbeat,
    decode_partition_map,
    encode_command,
    encode_heartbeat,
    encode_partition_map,
    message_type,
)
from conveyor.errors import CodecError

HB = Heartbeat(
    worker_id="w1",
    incarnation="abc",
    seq=7,
    sent_at=1_700_000_000.5,
    period_s=1.0,
    stats=WorkerStats(
        stages_available=("s1", "s2"),
        home_stages=("s1",),
        consuming=(QueueConsumption("q.s1", "s1", 12),),
        stages=(StageStats("s1", 100, 20, 1, 3, 0.01, 0.05, 5.0, 8),),
        routing_keys={"p.3": 40, "p.9": 2},
        provider="CPUExecutionProvider",
    ),
    acks=(CommandResult("c1", True), CommandResult("c2", False, "ConfigError: no stage")),
)


def test_heartbeat_round_trip() -> None:
    body = encode_heartbeat(HB)
    assert decode_heartbeat(body) == HB
    assert message_type(body) == "heartbeat"


def test_heartbeat_is_plain_msgpack() -> None:
    d = msgpack.unpackb(encode_heartbeat(HB))
    assert d["v"] == 1 and d["worker_id"] == "w1" and d["consuming"] == [["q.s1", "s1", 12]]


@pytest.mark.parametrize(
    "cmd",
    [
        Command("a", "w1", CommandKind.SET_PREFETCH, queue="q", prefetch=4, reason="r"),
        Command("b", "w1", CommandKind.START_CONSUMING, stage="s2"),
        Command("c", "w1", CommandKind.STOP_CONSUMING, stage="s2", queue="q2", issued_at=3.0),
    ],
)
def test_command_round_trip(cmd: Command) -> None:
    assert decode_command(encode_command(cmd)) == cmd


def test_partition_map_round_trip() -> None:
    pm = PartitionMap(3, "conveyor.x.input", {"p.1": "conveyor.x.input.1"}, 2.0, "hot")
    assert decode_partition_map(encode_partition_map(pm)) == pm


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": CommandKind.SET_PREFETCH, "queue": "q", "prefetch": 0},
        {"kind": CommandKind.SET_PREFETCH, "prefetch": 3},
        {"kind": CommandKind.START_CONSUMING},
    ],
)
def test_invalid_commands_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(CodecError):
        Command("x", "w1", **kwargs)  # type: ignore[arg-type]


def _mutate(body: bytes, **changes: object) -> bytes:
    d = msgpack.unpackb(body)
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return bytes(msgpack.packb(d))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"v": 2}, "version"),
        ({"type": "command"}, "expected a heartbeat"),
        ({"seq": "7"}, "seq"),
        ({"worker_id": KeyError}, "worker_id"),
        ({"consuming": [["q", "s"]]}, "consuming"),
        ({"stages": [{"stage": "s"}]}, "requests"),
        ({"routing_keys": {"p.1": "many"}}, "routing key count"),
        ({"acks": [["c", "yes", ""]]}, "ack ok"),
        ({"sent_at": True}, "sent_at"),
    ],
)
def test_malformed_heartbeat_names_the_field(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        decode_heartbeat(_mutate(encode_heartbeat(HB), **changes))


def test_unknown_command_kind() -> None:
    body = _mutate(encode_command(Command("b", "w", CommandKind.START_CONSUMING, stage="s")),
                   kind="reboot")
    with pytest.raises(CodecError, match="reboot"):
        decode_command(body)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb([1, 2])])
def test_garbage_is_a_codec_error(body: bytes) -> None:
    for decode in (decode_heartbeat, decode_command, decode_partition_map):
        with pytest.raises(CodecError):
            decode(body)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.binary(max_size=200) | st.builds(bytes, st.just(encode_heartbeat(HB))).map(
    lambda b: b[: len(b) // 2]))
def test_decoders_raise_only_codec_error(body: bytes) -> None:
    for decode in (decode_heartbeat, decode_command, decode_partition_map):
        with contextlib.suppress(CodecError):
            decode(body)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.dictionaries(
    st.sampled_from(list(msgpack.unpackb(encode_heartbeat(HB)))),
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=3)
    | st.lists(st.integers(0, 9), max_size=2),
))
def test_mutated_heartbeats_raise_only_codec_error(changes: dict[str, object]) -> None:
    with contextlib.suppress(CodecError):
        decode_heartbeat(_mutate(encode_heartbeat(HB), **changes))
