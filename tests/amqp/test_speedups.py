"""``workers.amqp.speedups``: the faster byte paths only on a tested aiormq, with an off
switch (URL and environment), all three replaced pieces checked, the decision logged once.

Every test starts from aiormq's own pieces and puts back what it found (``pristine``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import aio_pika
import aiormq.abc
import aiormq.channel
import aiormq.connection
import pytest

from conveyor.errors import ConfigError
from conveyor.transport import Delivery, Message, QueueSpec
from tests.support.amqp import Rabbit
from workers.amqp import AmqpSettings, frames, speedups
from workers.amqp.writer import CoalescingConnection

LOGGER = "workers.amqp.speedups"
URL = "amqp://guest:guest@rabbit.example:5672/"


@pytest.fixture
def pristine(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """aiormq's own pieces, no switch in the environment, nothing logged yet."""
    monkeypatch.setattr(aiormq.channel.Channel, "_split_body", frames.ORIGINAL_SPLIT_BODY)
    monkeypatch.setattr(aiormq.abc.ChannelFrame, "marshall", frames.ORIGINAL_MARSHALL)
    monkeypatch.setattr(aiormq.connection, "FrameReceiver", frames.ORIGINAL_RECEIVER)
    monkeypatch.delenv(speedups.ENV_SWITCH, raising=False)
    monkeypatch.setattr(speedups, "_logged", set())
    assert speedups.untouched()
    yield monkeypatch


def test_the_installed_aiormq_is_one_they_were_tested_against() -> None:
    # If this fails, pip resolved an aiormq the replacements were not tested on: the
    # transport runs the plain path. Run tests/amqp and tests/transport on it, then add
    # it to TESTED_AIORMQ (or pin aiormq).
    assert speedups.aiormq_version() in speedups.TESTED_AIORMQ


def test_on_installs_all_three_pieces_and_says_so(
    pristine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pristine.setattr(speedups, "TESTED_AIORMQ", frozenset({speedups.aiormq_version()}))
    with caplog.at_level("INFO", logger=LOGGER):
        assert speedups.connection_class(True) is CoalescingConnection
    assert speedups.installed()
    assert aiormq.channel.Channel._split_body is frames.split_body
    assert aiormq.abc.ChannelFrame.marshall.__func__ is frames.marshall  # type: ignore[attr-defined]
    assert aiormq.connection.FrameReceiver is frames.BodyJoiningReceiver
    assert f"speedups on (aiormq {speedups.aiormq_version()})" in caplog.text


def test_an_untested_aiormq_installs_nothing_and_says_which(
    pristine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pristine.setattr(speedups, "aiormq_version", lambda: "7.9.0")
    with caplog.at_level("INFO", logger=LOGGER):
        assert speedups.connection_class(True) is aio_pika.RobustConnection
    assert speedups.untouched()
    assert "untested aiormq version 7.9.0" in caplog.text
    assert "plain aio-pika/aiormq" in caplog.text


def test_off_from_the_url_leaves_aiormq_untouched(
    pristine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert AmqpSettings.from_url(URL).speedups is True
    settings = AmqpSettings.from_url(f"{URL}?speedups=off")
    assert settings.speedups is False
    with caplog.at_level("INFO", logger=LOGGER):
        assert speedups.connection_class(settings.speedups) is aio_pika.RobustConnection
    assert speedups.untouched()
    assert "speedups off by setting" in caplog.text


@pytest.mark.parametrize("value", ["0", "off", "false", "no"])
def test_off_from_the_environment_holds_for_every_transport(
    pristine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    env = {speedups.ENV_SWITCH: value}
    assert AmqpSettings.from_url_and_env(URL, env).speedups is False
    pristine.setenv(speedups.ENV_SWITCH, value)
    with caplog.at_level("INFO", logger=LOGGER):
        # a transport built from a URL alone (speedups=True) is plain too
        assert speedups.connection_class(True) is aio_pika.RobustConnection
    assert speedups.untouched()
    assert f"off by setting ({speedups.ENV_SWITCH}={value})" in caplog.text


def test_a_bad_switch_value_is_a_config_error(pristine: pytest.MonkeyPatch) -> None:
    pristine.setenv(speedups.ENV_SWITCH, "sometimes")
    with pytest.raises(ConfigError, match=speedups.ENV_SWITCH):
        speedups.decide(True)
    with pytest.raises(ConfigError, match="speedups"):
        AmqpSettings.from_url(f"{URL}?speedups=sometimes")


@pytest.mark.parametrize(
    ("owner", "attribute", "piece"),
    [
        (aiormq.channel.Channel, "_split_body", "Channel._split_body"),
        (aiormq.abc.ChannelFrame, "marshall", "ChannelFrame.marshall"),
        (aiormq.connection, "FrameReceiver", "aiormq.connection.FrameReceiver"),
    ],
)
def test_each_missing_piece_keeps_all_three_untouched(
    pristine: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    owner: object,
    attribute: str,
    piece: str,
) -> None:
    pristine.delattr(owner, attribute)
    with caplog.at_level("INFO", logger=LOGGER):
        assert speedups.connection_class(True) is aio_pika.RobustConnection
    assert not speedups.installed()
    assert aiormq.connection.__dict__.get("FrameReceiver") in (None, frames.ORIGINAL_RECEIVER)
    assert aiormq.channel.Channel.__dict__.get("_split_body") in (
        None, frames.ORIGINAL_SPLIT_BODY
    )
    assert aiormq.abc.ChannelFrame.__dict__.get("marshall") in (None, frames.ORIGINAL_MARSHALL)
    assert f"lacks or changed {piece}" in caplog.text


def test_a_piece_replaced_by_someone_else_is_left_alone(pristine: pytest.MonkeyPatch) -> None:
    assert isinstance(frames.ORIGINAL_RECEIVER, type)
    other = type("OtherReceiver", (frames.ORIGINAL_RECEIVER,), {})
    pristine.setattr(aiormq.connection, "FrameReceiver", other)
    decision = speedups.decide(True)
    assert not decision.on
    assert "aiormq.connection.FrameReceiver" in decision.reason
    speedups.connection_class(True)
    assert aiormq.connection.FrameReceiver is other
    assert aiormq.channel.Channel._split_body is frames.ORIGINAL_SPLIT_BODY


def test_each_decision_is_logged_once(
    pristine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger=LOGGER):
        for _ in range(3):
            speedups.connection_class(False)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


def test_off_after_on_in_one_process_says_the_framing_stays(
    pristine: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pristine.setattr(speedups, "TESTED_AIORMQ", frozenset({speedups.aiormq_version()}))
    speedups.connection_class(True)
    with caplog.at_level("INFO", logger=LOGGER):
        assert speedups.connection_class(False) is aio_pika.RobustConnection
    assert "framing stays replaced in this process" in caplog.text


@pytest.mark.rabbitmq
async def test_the_plain_path_carries_large_and_small_bodies_through_rabbitmq(
    pristine: pytest.MonkeyPatch, rabbit: Rabbit
) -> None:
    bodies = {"big": os.urandom(3_300_000), "small": b"x" * 17, "frame": os.urandom(131_073)}
    transport = await rabbit.connect(speedups="off")
    assert type(transport._pub_connection) is aio_pika.RobustConnection
    assert type(transport._con_connection) is aio_pika.RobustConnection
    queue = rabbit.name("plain")
    await transport.declare_queue(QueueSpec(name=queue))
    received: dict[str, bytes] = {}
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        received[str(delivery.message.message_id)] = delivery.message.body
        await delivery.ack()
        if len(received) == len(bodies):
            done.set()

    await transport.consume(queue, handler, prefetch=2)
    for key, body in bodies.items():
        await transport.publish("", Message(body=body, message_id=key), routing_key=queue)
    async with asyncio.timeout(30):
        await done.wait()
    assert received == bodies
    assert speedups.untouched()
