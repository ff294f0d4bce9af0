"""``conveyor.eager.step``: a coroutine that never waits costs no task; one that waits
goes on in a task that relays results, exceptions and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.eager import is_eager, mark_eager, step


async def test_a_coroutine_that_does_not_wait_finishes_in_the_call() -> None:
    seen: list[int] = []

    async def quick() -> None:
        seen.append(1)

    assert step(quick()) is None
    assert seen == [1]


async def test_an_exception_before_the_first_wait_reaches_the_caller() -> None:
    async def bad() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        step(bad())


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_its_results() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    log: list[object] = []

    async def waits() -> int:
        log.append("first")
        value = await fut
        log.append(value)
        await asyncio.sleep(0)
        log.append(asyncio.current_task() is not None)
        return value * 2

    task = step(waits())
    assert task is not None and log == ["first"]
    fut.set_result(21)
    assert await task == 42
    assert log == ["first", 21, True]


async def test_exceptions_and_cancellation_reach_the_waiting_coroutine() -> None:
    loop = asyncio.get_running_loop()
    failing: asyncio.Future[int] = loop.create_future()
    blocked: asyncio.Future[int] = loop.create_future()
    cleaned: list[str] = []

    async def waits(fut: asyncio.Future[int]) -> int:
        try:
            return await fut
        except ValueError:
            cleaned.append("caught")
            return -1
        finally:
            cleaned.append("finally")

    task = step(waits(failing))
    assert task is not None
    failing.set_exception(ValueError("x"))
    assert await task == -1
    assert cleaned == ["caught", "finally"]

    cleaned.clear()
    task = step(waits(blocked))
    assert task is not None
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert blocked.cancelled()
    assert cleaned == ["finally"]


def test_mark_eager_marks_functions_and_their_bound_methods() -> None:
    class Handler:
        @mark_eager
        async def handle(self) -> None: ...

        async def plain(self) -> None: ...

    assert is_eager(Handler().handle)
    assert not is_eager(Handler().plain)
