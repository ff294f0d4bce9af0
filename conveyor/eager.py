"""Run a coroutine's first step now; pay for a task only if it has to wait.

Python 3.12's eager tasks in miniature, for the hot path on Python 3.11: most handlers
and settle steps on the embedded broker finish without ever waiting, and a task per
call (creation, scheduling, done callbacks) costs more than the work itself.

``step(coro)`` runs ``coro`` until it first suspends. If it finished, ``step`` returns
``None`` (its exception, if any, propagates to the caller); if it suspended, ``step``
returns a task that continues it from where it stopped (send, throw and cancel reach
the coroutine as they would in a task of its own).

On Python 3.11 the first step runs outside a task: ``asyncio.current_task()`` is the
caller's (or ``None``), so a coroutine that needs its own task before its first
suspension (``asyncio.timeout``, ``TaskGroup``) must not be started this way; handlers
say they are fit for it with ``mark_eager``. From 3.12 on, ``step`` is an eager task
(``eager_start``), which has its own task from the start.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_EAGER_ATTR = "__conveyor_eager__"
#: Python 3.12+: ``asyncio.Task(..., eager_start=True)`` does this with a task of its own.
_EAGER_TASKS = sys.version_info >= (3, 12)


def mark_eager(handler: F) -> F:
    """Declare that ``handler``'s coroutines may run their first step outside a task."""
    setattr(handler, _EAGER_ATTR, True)
    return handler


def is_eager(handler: object) -> bool:
    return getattr(handler, _EAGER_ATTR, False) is True


def step(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T] | None:
    """Run ``coro`` to its first suspension; None if it finished, else the task going on."""
    if _EAGER_TASKS:
        task: asyncio.Task[T] = asyncio.Task(  # type: ignore[call-arg,unused-ignore]
            coro, loop=asyncio.get_running_loop(), name=name, eager_start=True
        )
        if not task.done():
            return task
        task.result()  # its exception, if any, reaches the caller
        return None
    try:
        pending = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_continue(_Resume(coro, pending)), name=name)


class _Resume:
    """Awaitable that hands a started coroutine's pending yield to the awaiting task and
    relays what the task sends or throws back into it (``yield from`` for a started one)."""

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._pending
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # relayed into the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                value = coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _continue(resume: _Resume) -> Any:
    return await resume
