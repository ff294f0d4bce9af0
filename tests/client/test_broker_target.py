"""Where commands and ``connect()`` go: ``--broker``, ``$CONVEYOR_AMQP_URL``, or in-process."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import conveyor
from conveyor.app.cli import main
from conveyor.app.transports import AMQP_URL_ENV, BrokerTarget
from conveyor.errors import BrokerUnreachable, ConfigError
from conveyor.plan import Plan

#: Nothing listens here: a command that honours the variable fails to connect at once.
DEAD_URL = "amqp://someone:secret@127.0.0.1:1/prod"


def test_the_explicit_url_wins_then_the_environment_then_the_embedded_broker() -> None:
    env = {AMQP_URL_ENV: "amqp://a:b@envhost:5672/"}
    assert BrokerTarget.resolve("amqp://x:y@flag/", env=env).url == "amqp://x:y@flag/"
    assert BrokerTarget.resolve(None, env=env).url == "amqp://a:b@envhost:5672/"
    assert BrokerTarget.resolve(None, env={}).embedded
    assert BrokerTarget.resolve(None, env={AMQP_URL_ENV: "  "}).embedded
    assert BrokerTarget.resolve(None, embedded=True).embedded
    with pytest.raises(ConfigError, match="exclude each other"):
        BrokerTarget.resolve("amqp://x/", embedded=True)


def test_a_worker_without_a_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(AMQP_URL_ENV, raising=False)
    with pytest.raises(ConfigError, match=AMQP_URL_ENV):
        BrokerTarget.required(None, "worker")


def test_describe_names_host_port_and_vhost_but_never_credentials() -> None:
    text = BrokerTarget(DEAD_URL).describe()
    assert text == "RabbitMQ at 127.0.0.1:1 (vhost 'prod')"
    assert "secret" not in text and "someone" not in text
    assert "5671" in BrokerTarget("amqps://h/").describe()
    assert "embedded" in BrokerTarget(None).describe()


async def test_embedded_connections_share_one_broker() -> None:
    target = BrokerTarget(None)
    first, second = await target.connect(), await target.connect()
    try:
        assert target.broker is not None
        from conveyor.transport import QueueSpec

        await first.declare_queue(QueueSpec("shared-q"))
        assert (await second.queue_stats("shared-q")).depth == 0  # the same broker
    finally:
        await first.close()
        await second.close()


def test_infer_honours_the_environment_and_says_where_it_goes(
    scale_plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    np.save(tmp_path / "x.npy", np.ones((1, 3), np.float32))
    monkeypatch.setenv(AMQP_URL_ENV, DEAD_URL)
    code = main(["infer", str(scale_plan.directory), str(tmp_path / "x.npy")])
    err = capsys.readouterr().err
    assert code == 2  # BrokerUnreachable: it went to the URL, not in-process
    assert "on RabbitMQ at 127.0.0.1:1 (vhost 'prod')" in err
    assert "secret" not in err
    # --embedded overrides the variable and answers in-process.
    assert main(["infer", str(scale_plan.directory), str(tmp_path / "x.npy"), "--embedded"]) == 0
    assert "in-process workers on the embedded broker" in capsys.readouterr().err


async def test_connect_without_url_uses_the_environment(
    scale_plan: Plan, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(AMQP_URL_ENV, DEAD_URL)
    with pytest.raises(BrokerUnreachable):
        async with conveyor.connect(plan=scale_plan):
            pass
    monkeypatch.delenv(AMQP_URL_ENV)
    caplog.set_level(logging.INFO, logger="conveyor.client")
    async with conveyor.connect(plan=scale_plan) as client:
        out = await client.infer({"x": np.ones((1, 3), np.float32)}, timeout=10)
    np.testing.assert_allclose(out["y"], 4.0)
    assert "on the embedded broker (in this process) with in-process workers" in caplog.text


def test_v_is_accepted_after_the_sub_command(
    scale_plan: Plan, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(AMQP_URL_ENV, raising=False)
    np.save(tmp_path / "x.npy", np.ones((1, 3), np.float32))
    assert main(["infer", str(scale_plan.directory), str(tmp_path / "x.npy"), "-v"]) == 0
