"""``conveyor worker`` / ``conveyor run`` as processes: refusal of bad plans, SIGTERM mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.plan import Plan
from tests.support.brokers import BrokerHandle
from tests.support.pipeline import Harness
from tests.support.plans import chain_expected, chain_plan

ROOT = Path(__file__).resolve().parents[2]


def conveyor(*args: str) -> list[str]:
    return [sys.executable, "-m", "conveyor", *args]


def test_worker_refuses_a_plan_whose_hash_fails(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path, k=2)
    with (tmp_path / plan.stages[1].file).open("ab") as f:
        f.write(b"tampered")
    done = subprocess.run(
        conveyor("worker", str(tmp_path), "--stage", "s0", "--broker", "amqp://nowhere/"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2
    assert "corrupt" in done.stderr


def test_worker_needs_a_broker(tmp_path: Path) -> None:
    chain_plan(tmp_path, k=1)
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_AMQP_URL"}
    done = subprocess.run(
        conveyor("worker", str(tmp_path), "--stage", "s0"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert done.returncode == 2
    assert "--broker" in done.stderr


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        *conveyor(*args),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode()
            if not line:
                err = await proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"worker exited before ready: {err.decode()[-2000:]}")
            if line.strip() == "conveyor: ready":
                return proc


@pytest.mark.rabbitmq
async def test_sigterm_mid_stream_loses_nothing(
    rabbitmq_url: str, tmp_path: Path, unique: str
) -> None:
    plan = Plan.load(chain_plan(tmp_path, k=3, name=unique, max_batch=1).directory)
    handle = BrokerHandle("rabbitmq", rabbitmq_url)
    client = await Harness(await handle.connect(), plan).open()
    procs: list[asyncio.subprocess.Process] = []
    try:
        n = 600
        xs = np.random.default_rng(1).random((n, 1, 4), dtype=np.float32)
        ids = await asyncio.gather(*(client.send({"x": x}) for x in xs))
        inputs = dict(zip(ids, xs, strict=True))
        first = await _spawn(
            "worker",
            str(tmp_path),
            "--stage",
            "s0",
            "--stage",
            "s1",
            "--stage",
            "s2",
            "--broker",
            rabbitmq_url,
            "--prefetch",
            "4",
            "--threads",
            "1",
            "--grace",
            "10",
        )
        procs.append(first)
        await client.wait_for(list(inputs)[:5])
        first.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await first.wait() == 0
        answered_by_first = len(client.replies)
        assert answered_by_first < n, "the stream ended before SIGTERM; nothing was tested"
        # The rest (never delivered, or delivered and handed back) goes to the next process.
        procs.append(await _spawn("run", str(tmp_path), "--broker", rabbitmq_url))
        await client.wait_for(list(inputs), within=60)
        for rid, x in inputs.items():
            for result in client.replies[rid]:
                assert not isinstance(result, Exception), result
                np.testing.assert_allclose(result["y"], chain_expected(x, 3), rtol=1e-5)
        assert client.dead == []
        procs[-1].send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await procs[-1].wait() == 0
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await client.close()
        await handle.cleanup()
