"""One way for a test to wait: ``until(condition, timeout, what)``, and the waits built on it.

A condition is a plain or an async callable returning a truth value; ``until`` checks it,
sleeps ``every`` seconds, and checks again until it holds or ``timeout`` seconds have
passed, then fails with an ``AssertionError`` that names what it waited for (``what`` may
be a callable, read at that moment, so the message can carry the state that was reached).
A condition may raise itself to fail at once (a worker process that died, say).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from conveyor.errors import TransportError
from conveyor.transport import Transport

Condition = Callable[[], object] | Callable[[], Awaitable[object]]
What = str | Callable[[], str]

#: Between two checks: short against the waits tests make (tens of ms to seconds).
EVERY = 0.02


async def until(
    condition: Condition,
    timeout: float,  # noqa: ASYNC109 - the budget is the point of this helper
    what: What,
    *,
    every: float = EVERY,
) -> float:
    """Wait until ``condition()`` holds; the seconds it took (AssertionError on timeout).

    ``every=0`` only yields to the event loop between checks: for conditions that other
    tasks of this loop make true, with no wall-clock time in between.
    """
    start = time.perf_counter()
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {text}")
        await asyncio.sleep(every)


async def queue_depth(transport: Transport, queue: str) -> int:
    """Ready messages in ``queue``."""
    return (await transport.queue_stats(queue)).depth


async def until_depth(
    transport: Transport,
    queue: str,
    depth: int,
    timeout: float = 10.0,  # noqa: ASYNC109
    *,
    exact: bool = False,
) -> int:
    """Wait until ``queue`` holds ``depth`` ready messages (at least, or ``exact``ly); the
    depth reached."""
    seen = -1

    async def reached() -> bool:
        nonlocal seen
        seen = await queue_depth(transport, queue)
        return seen == depth if exact else seen >= depth

    want = f"{depth}" if exact else f">= {depth}"
    await until(reached, timeout, lambda: f"{want} messages in {queue} (it holds {seen})",
                every=0.05)
    return seen


async def consumers(transport: Transport, queue: str) -> int:
    """Consumers of ``queue``; 0 while it is not declared yet."""
    try:
        return int((await transport.queue_stats(queue)).consumers)
    except TransportError:
        return 0
