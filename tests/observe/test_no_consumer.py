"""A client whose plan has no worker says so at once instead of waiting for its timeout."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from conveyor.app.cli import main
from conveyor.client import Client
from conveyor.errors import DeadlineExceeded, NoConsumerError
from tests.support.brokers import BrokerHandle
from tests.support.plans import chain_plan
from workers.stage_worker import StageWorker

X = {"x": np.ones((1, 4), np.float32)}


async def test_fail_mode_raises_at_once_naming_the_command(
    broker: BrokerHandle, tmp_path: Path, unique: str
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    async with Client(plan, await broker.connect(), on_no_consumer="fail", timeout=30) as c:
        started = time.monotonic()
        with pytest.raises(NoConsumerError, match=r"conveyor worker .* --stage s0"):
            await c.infer(X)
        assert time.monotonic() - started < 5  # not the 30 s timeout
        worker = StageWorker(plan, await broker.connect())
        await worker.start()
        try:
            assert "y" in await c.infer(X)  # once a worker is there, requests go through
        finally:
            await worker.stop(grace=0.5)


async def test_the_sdk_warns_once_by_default(
    broker: BrokerHandle, tmp_path: Path, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    plan = chain_plan(tmp_path, 2, name=unique)
    caplog.set_level(logging.WARNING, logger="conveyor.client")
    async with Client(plan, await broker.connect()) as c:
        for _ in range(2):
            with pytest.raises(DeadlineExceeded):
                await c.infer(X, timeout=0.2)
    warnings = [r for r in caplog.records if "no worker consumes" in r.getMessage()]
    assert len(warnings) == 1 and "conveyor run" in warnings[0].getMessage()


@pytest.mark.rabbitmq
def test_conveyor_infer_fails_fast_without_workers(
    rabbitmq_url: str, tmp_path: Path, unique: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plan").mkdir()
    plan = chain_plan(tmp_path / "plan", 2, name=unique)
    np.save(tmp_path / "x.npy", X["x"])
    started = time.monotonic()
    code = main(["infer", str(plan.directory), str(tmp_path / "x.npy"), "--broker",
                 rabbitmq_url, "--timeout", "30"])
    assert code == 2 and time.monotonic() - started < 15
    assert "no worker consumes the input queue" in capsys.readouterr().err
