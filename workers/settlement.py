"""Who acks what, and when: a delivery is settled once every request it carried is done.

A ``Lot`` wraps one delivery holding ``n`` requests. Each request travels through the
process with an ``Obligation`` (its token); the token forks when the request's outputs go
to several places (fan-out, reply) and merges when a join gathers parts from several
tokens. When a token's last branch is done, it reports to its parents; when a lot's last
request is done, the delivery is settled once: requeued if any branch must be retried
(an output publish failed), dead-lettered if any failed, else acked. A failed branch
names its ``Cause`` (error code and text, request and trace id, stage); the lot keeps them
and hands them to its ``dead_letter`` step (``workers.dead_letters``: publish a copy that
says why, then ack), or rejects the delivery when it has none. Settling is shielded from
cancellation: the output it guards is already out. It starts at once
(``conveyor.eager.step``): a settle that completes without waiting (the embedded broker's)
cannot be cancelled half-way and needs no task; one that waits goes on in a task the
caller awaits through ``asyncio.shield``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from conveyor.eager import step
from conveyor.envelope import RequestMeta
from conveyor.errors import ConveyorError, TransportError
from conveyor.transport import Delivery

log = logging.getLogger(__name__)


class Outcome(IntEnum):
    """How a branch ended; a lot takes the worst of its branches."""

    OK = 0
    #: Failed for good (bad input, inference error): reject to the dead-letter exchange.
    FAILED = 1
    #: Not done (output publish failed, shutdown): requeue so that it runs again.
    RETRY = 2


@dataclass(frozen=True, slots=True)
class Cause:
    """Why a request failed for good: what its dead letter says."""

    code: str
    message: str
    request_id: str | None = None
    #: As the request carried it (a ``traceparent`` or any string).
    trace_id: str | None = None
    #: The stage it failed at (None: before any, e.g. an unreadable message).
    stage: str | None = None

    @classmethod
    def of(cls, error: ConveyorError, meta: RequestMeta | None, stage: str | None) -> Cause:
        return cls(
            error.code,
            str(error),
            None if meta is None else meta.request_id,
            None if meta is None else meta.trace_id,
            stage,
        )


class Obligation:
    """A countdown of open branches; reports the worst outcome (and the first cause of a
    failure) to its parents at zero."""

    def __init__(self, parents: list[Obligation], branches: int = 1) -> None:
        self._parents = parents
        self._open = branches
        self._worst = Outcome.OK
        self._cause: Cause | None = None

    @property
    def open(self) -> int:
        return self._open

    def fork(self, branches: int) -> None:
        """This branch becomes ``branches`` branches (0: it ends now; call ``done``)."""
        if self._open <= 0:
            raise RuntimeError("fork of a finished obligation")
        self._open += branches - 1

    async def done(self, outcome: Outcome = Outcome.OK, cause: Cause | None = None) -> None:
        """One branch ended; ``cause``: why, when it failed (``Outcome.FAILED``)."""
        if self._open <= 0:
            raise RuntimeError("done called more often than there are branches")
        self._worst = max(self._worst, outcome)
        if cause is not None:
            self._note(cause)
        self._open -= 1
        if self._open == 0:
            await self._finished(self._worst)

    def _note(self, cause: Cause) -> None:
        if self._cause is None:
            self._cause = cause

    async def _finished(self, outcome: Outcome) -> None:
        for parent in self._parents:
            await parent.done(outcome, self._cause)


#: Gives a delivery back to be run again (default ``Delivery.requeue``).
Requeue = Callable[[Delivery], Awaitable[None]]


async def _requeue(delivery: Delivery) -> None:
    await delivery.requeue()


#: Settles a failed delivery as a dead letter naming ``causes`` (``DeadLetters.send``).
DeadLetter = Callable[[Delivery, Sequence[Cause]], Awaitable[None]]


class Lot(Obligation):
    """The obligation of one delivery: settles it when all its requests are done.
    ``requeue`` gives it back on ``RETRY`` (the worker's ``RedeliveryGuard.requeue`` does
    it without the broker counting a redelivery); ``dead_letter`` settles it on ``FAILED``
    (None: ``Delivery.reject``, the broker dead-letters it without a cause)."""

    def __init__(
        self,
        delivery: Delivery,
        requests: int,
        on_settled: Callable[[Lot], None] | None = None,
        requeue: Requeue = _requeue,
        dead_letter: DeadLetter | None = None,
    ) -> None:
        super().__init__([], max(1, requests))
        self.delivery = delivery
        self._on_settled = on_settled
        self._requeue = requeue
        self._dead_letter = dead_letter
        self.outcome: Outcome | None = None
        #: Why its failed requests failed, in the order they did.
        self.causes: list[Cause] = []

    def request(self) -> Obligation:
        """A token for one of the lot's requests."""
        return Obligation([self])

    def _note(self, cause: Cause) -> None:
        self.causes.append(cause)

    async def _finished(self, outcome: Outcome) -> None:
        self.outcome = outcome
        # Shielded: the outputs this settles are published; a cancel must not lose the ack.
        # Started now: if it completes without waiting, nothing could interrupt it.
        rest = step(self._settle(outcome))
        if rest is not None:
            await asyncio.shield(rest)

    async def _settle(self, outcome: Outcome) -> None:
        try:
            if outcome is Outcome.OK:
                await self.delivery.ack()
            elif outcome is Outcome.FAILED:
                if self._dead_letter is None:
                    await self.delivery.reject()
                else:
                    await self._dead_letter(self.delivery, self.causes)
            else:
                await self._requeue(self.delivery)
        except TransportError as exc:
            # The channel died: the broker redelivers the message; duplicates are fine.
            log.warning("could not settle a delivery (%s): it will be redelivered", exc)
        finally:
            if self._on_settled is not None:
                self._on_settled(self)
