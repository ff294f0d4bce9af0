"""Controller test fixtures: a ``rig`` factory on the ``broker`` fixture (tests/support)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from conveyor.plan import Plan
from tests.controller.rig import Rig
from tests.support.brokers import BrokerHandle


@pytest.fixture
async def rigs(broker: BrokerHandle) -> AsyncIterator[Callable[[Plan], Rig]]:
    made: list[Rig] = []

    def make(plan: Plan) -> Rig:
        rig = Rig(broker, plan)
        made.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in made:
            await rig.close()
