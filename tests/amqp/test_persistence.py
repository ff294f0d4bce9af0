"""Persistent messages, settable from the command line, the URL, the environment and the
plan: precedence CLI > URL/env > plan > default (persistent), and what reaches the broker
is the AMQP delivery mode of each published message (read back with ``basic.get``)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aio_pika
import pytest

from conveyor.app.cli import build_parser
from conveyor.app.cmd_serve import broker_target
from conveyor.app.transports import BrokerTarget
from conveyor.errors import PlanError
from conveyor.plan import PLAN_FILE, Plan, QueueSettings
from conveyor.transport import Message, QueueSpec
from tests.support.plans import chain_plan

PERSISTENT, TRANSIENT = 2, 1


def test_the_plan_setting_is_absent_unless_chosen(tmp_path: Path) -> None:
    def fresh(name: str) -> Plan:
        (tmp_path / name).mkdir()
        return Plan.load(chain_plan(tmp_path / name).directory)

    quorum = fresh("q")
    quorum.with_settings(queues=QueueSettings("quorum", 2)).save(tmp_path / "q")
    body = json.loads((tmp_path / "q" / PLAN_FILE).read_text())
    # Plans that chose a queue type before this setting existed keep their JSON and hash.
    assert body["queues"] == {"type": "quorum", "delivery_limit": 2}
    plain = fresh("t")
    transient = plain.with_settings(queues=QueueSettings(persistent=False)).save(tmp_path / "t")
    assert transient.hash != plain.hash
    assert Plan.load(tmp_path / "t").queues.persistent is False
    body = json.loads((tmp_path / "t" / PLAN_FILE).read_text())
    assert body["queues"]["persistent"] is False
    with pytest.raises(PlanError, match=r"queues\.persistent"):
        Plan.from_dict({**body, "queues": {"persistent": "no"}})


@pytest.mark.parametrize(
    ("argv", "chosen"),
    [([], None), (["--persistent"], True), (["--no-persistent"], False)],
)
@pytest.mark.parametrize("command", ["worker", "run", "infer", "bench", "gateway",
                                     "controller"])
def test_every_command_that_publishes_takes_the_flag(
    command: str, argv: list[str], chosen: bool | None
) -> None:
    extra = {"infer": ["x.npy"], "worker": ["--stage", "s0"]}.get(command, [])
    args = build_parser().parse_args([command, "plan-dir", *extra, *argv])
    assert args.persistent is chosen
    if command in ("run", "infer", "bench", "gateway"):
        assert broker_target(args).persistent is chosen


async def delivery_mode(url: str, target: BrokerTarget, plan: Plan | None) -> int:
    """Publish one message through ``target``'s transport and read its delivery mode."""
    queue = f"t.persist.{uuid.uuid4().hex[:10]}"
    transport = await target.connect(plan=plan)
    connection = await aio_pika.connect(url)
    try:
        await transport.declare_queue(QueueSpec(queue, durable=True))
        await transport.publish("", Message(b"x"), queue)
        channel = await connection.channel()
        got = await (await channel.get_queue(queue)).get(no_ack=True)
        assert got is not None
        return int(got.delivery_mode)
    finally:
        await transport.delete_queue(queue)
        await transport.close(grace=0.5)
        await connection.close()


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("cli", "query", "env", "in_plan", "want"),
    [
        (None, None, None, None, PERSISTENT),  # the default
        (None, None, None, False, TRANSIENT),  # the plan
        (None, "1", None, False, PERSISTENT),  # the URL over the plan
        (None, None, "0", True, TRANSIENT),  # the environment over the plan
        (True, "0", None, False, PERSISTENT),  # the command line over all
        (False, None, "1", True, TRANSIENT),
    ],
)
async def test_persistence_reaches_the_delivery_mode(
    rabbitmq_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    cli: bool | None, query: str | None, env: str | None, in_plan: bool | None, want: int,
) -> None:
    if env is None:
        monkeypatch.delenv("CONVEYOR_AMQP_PERSISTENT", raising=False)
    else:
        monkeypatch.setenv("CONVEYOR_AMQP_PERSISTENT", env)
    plan = Plan.load(chain_plan(tmp_path).directory)
    if in_plan is not None:
        plan = plan.with_settings(queues=QueueSettings(persistent=in_plan))
    url = rabbitmq_url if query is None else f"{rabbitmq_url}?persistent={query}"
    target = BrokerTarget(url, persistent=cli)
    assert await delivery_mode(rabbitmq_url, target, plan) == want
