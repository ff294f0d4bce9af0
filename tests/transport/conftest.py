"""One conformance suite, two brokers: every test here runs on brokerless and RabbitMQ
(the ``broker`` fixture, tests/support/brokers.py), with plain and with eager handlers."""

from __future__ import annotations

import pytest


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The conformance suite (this directory only) runs with plain and with eager handlers;
    suites elsewhere that use ``broker`` keep plain ones."""
    if "broker" in metafunc.fixturenames:
        metafunc.fixturenames.append("handlers")
        metafunc.parametrize("handlers", ["plain", "eager"], indirect=True)


@pytest.fixture
def handlers(request: pytest.FixtureRequest) -> str:
    """How handlers given to ``consume`` run here: "plain" or "eager"."""
    return str(request.param)
