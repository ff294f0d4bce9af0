"""Fixtures every suite may use, from tests/support: ``rabbitmq_url`` and ``broker``
(brokers.py), ``pipeline`` (pipeline.py). Registered here, once, as plugins, so no test
module imports a conftest. ``--slow`` also runs the tests marked ``slow`` (soak variants)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.support.brokers", "tests.support.pipeline", "tests.support.amqp"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true",
                     help="also run the tests marked slow (soak variants, large models)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
