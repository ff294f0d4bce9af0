"""Where a stage's onnxruntime runs: quick batches on the event loop, slow ones on the
stage's thread, decided by run times measured on the loop (never inflated by a wait for
the thread or the GIL)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from workers import runner as runner_module
from workers.runner import INLINE_PROBE_EVERY, StageRunner


class TimedSession:
    """Stands in for a StageSession: echoes its input after ``seconds``."""

    provider = "CPUExecutionProvider"
    input_names = ["x"]

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.threads: list[str] = []

    def run_bound(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self.threads.append(threading.current_thread().name)
        time.sleep(self.seconds)
        return {"y": feeds["x"]}


def runner(session: TimedSession) -> StageRunner:
    return StageRunner(
        "s", None, session, None,  # type: ignore[arg-type]
        max_batch=4, max_delay_ms=1.0, sources=(),
    )


async def test_quick_batches_run_on_the_event_loop_thread(monkeypatch: Any) -> None:
    # "Quick" against a limit a loaded 2-core machine cannot miss by preemption alone
    # (a 0 s session measured 0.5 ms+ under a load average of 5).
    monkeypatch.setattr(runner_module, "INLINE_BELOW_MS", 50.0)
    session = TimedSession(0.0)
    r = runner(session)
    for _ in range(5):
        out = await r._infer({"x": np.ones((2, 3), np.float32)})
        assert out["y"].shape == (2, 3)
    assert session.threads == [threading.current_thread().name] * 5


async def test_slow_batches_move_to_the_stage_thread_and_are_measured_again() -> None:
    session = TimedSession(0.002)  # 2 ms, four times the inline limit
    r = runner(session)
    loop_thread = threading.current_thread().name
    for _ in range(INLINE_PROBE_EVERY + 3):
        await r._infer({"x": np.ones((1, 3), np.float32)})
    on_loop = [i for i, name in enumerate(session.threads) if name == loop_thread]
    # The first batch measures, the others run on the thread, one in INLINE_PROBE_EVERY
    # comes back to measure again.
    assert on_loop == [0, INLINE_PROBE_EVERY + 1]
    assert all(name.startswith("ort-s") for i, name in enumerate(session.threads)
               if i not in on_loop)
    await r.cancel()


async def test_a_stage_that_speeds_up_comes_back_to_the_loop(monkeypatch: Any) -> None:
    monkeypatch.setattr(runner_module, "INLINE_PROBE_EVERY", 3)
    session = TimedSession(0.002)
    r = runner(session)
    await r._infer({"x": np.ones((1, 3), np.float32)})  # measured slow (a warm-up, say)
    session.seconds = 0.0
    for _ in range(10):
        await r._infer({"x": np.ones((1, 3), np.float32)})
    loop_thread = threading.current_thread().name
    # Three batches on the thread, then the probe finds it quick: back on the loop.
    assert all(name.startswith("ort-s") for name in session.threads[1:4])
    assert session.threads[4:] == [loop_thread] * 7
    await r.cancel()
