"""``conveyor bench``: its numbers against a service of known time, and on a real plan."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.app.bench_tool import closed_loop, open_loop, parse_levels, random_inputs
from conveyor.app.cli import main
from conveyor.errors import ConfigError, InferenceError
from conveyor.plan import Plan

SERVICE_S = 0.01


class OneSlot:
    """A synthetic server: one request at a time, each taking SERVICE_S seconds."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.served = 0

    async def infer(self, inputs: Any) -> dict[str, np.ndarray]:
        async with self.lock:
            await asyncio.sleep(SERVICE_S)
            self.served += 1
        return {}


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_closed_loop_matches_a_known_service_time(concurrency: int) -> None:
    """One slot of 10 ms: ~100 req/s at any concurrency; Little's law gives the latency."""
    server = OneSlot()
    point = await closed_loop(server.infer, [{}], concurrency, 1.0)
    assert point.errors == 0
    assert point.requests == server.served
    assert 70 <= point.throughput <= 101
    assert point.p50_ms == pytest.approx(concurrency * SERVICE_S * 1e3, rel=0.35)
    assert point.p50_ms <= point.p90_ms <= point.p99_ms
    assert point.cpu_ms_per_request < SERVICE_S * 1e3  # the server sleeps: little CPU


async def test_open_loop_sends_at_the_rate_asked() -> None:
    """Under capacity (50/s against 100/s) the throughput is the rate, latency ~ service."""
    server = OneSlot()
    point = await open_loop(server.infer, [{}], 50, 1.0)
    assert point.requests == 50 and point.errors == 0
    assert 40 <= point.throughput <= 51
    assert point.p50_ms == pytest.approx(SERVICE_S * 1e3, rel=0.5)


async def test_failures_are_counted_by_type_not_raised() -> None:
    calls = 0

    async def flaky(inputs: Any) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.001)
        if calls % 2:
            raise InferenceError("stage failed")

    point = await closed_loop(flaky, [{}], 2, 0.3)
    assert point.errors == point.error_kinds["InferenceError"]
    assert 0 < point.errors < point.requests
    assert point.throughput == pytest.approx((point.requests - point.errors) / point.seconds)


def test_levels_and_inputs(scale_plan: Plan) -> None:
    assert parse_levels("1,4,16") == [1, 4, 16]
    with pytest.raises(ConfigError):
        parse_levels("0,4")
    (request,) = random_inputs(scale_plan, batch=5, count=1)
    assert request["x"].shape == (5, 3) and request["x"].dtype == np.float32


def test_cli_sweep_on_a_real_plan_prints_json(
    scale_plan: Plan, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv("CONVEYOR_AMQP_URL", raising=False)
    png = tmp_path / "curve.png"
    assert main(["bench", str(scale_plan.directory), "--concurrency", "1,4", "--seconds",
                 "0.5", "--warmup", "0.1", "--json", "--no-progress", "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["level"] for p in report["points"]] == [1, 4]
    for p in report["points"]:
        assert p["errors"] == 0 and p["requests"] > 0 and p["cpu_ms_per_request"] > 0
        assert p["throughput"] == pytest.approx(p["requests"] / p["seconds"], rel=1e-3)
        # The per-stage split of the level, read from the in-process workers' metrics.
        (split,) = p["stages"]
        assert split["stage"] == "scale" and split["requests"] >= p["requests"]
        assert split["compute_ms_per_batch"] > 0 and split["mean_batch"] >= 1
        assert split["queue_wait_ms"] >= 0 and split["batch_wait_ms"] >= 0
    assert report["stages"][0]["stage"] == "scale"
    assert report["stages"][0]["requests"] >= sum(p["requests"] for p in report["points"])
    assert png.stat().st_size > 1000


def test_cli_counts_a_failing_plan_as_errors(
    scale_plan: Plan, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Requests the plan refuses (wrong shape from --inputs) show up as CodecError."""
    monkeypatch.delenv("CONVEYOR_AMQP_URL", raising=False)
    np.savez(tmp_path / "bad.npz", x=np.ones((1, 4), np.float32))
    assert main(["bench", str(scale_plan.directory), "--concurrency", "2", "--seconds",
                 "0.2", "--warmup", "0", "--inputs", str(tmp_path / "bad.npz"), "--json"]) == 0
    (point,) = json.loads(capsys.readouterr().out)["points"]
    assert point["errors"] == point["requests"] > 0
    assert set(point["error_kinds"]) == {"CodecError"}
