"""Shared fixtures: where RabbitMQ is, and whether tests may skip without it.

Tests marked ``rabbitmq`` run against ``CONVEYOR_AMQP_URL`` (default: the local server).
Outside CI they skip when no server answers; in CI (``CI`` set) they fail instead, so the
RabbitMQ half of the suite can never be skipped silently there.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def amqp_url() -> str:
    return os.environ.get("CONVEYOR_AMQP_URL", DEFAULT_AMQP_URL)


def _rabbit_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    url = amqp_url()
    if not _rabbit_answers(url):
        if os.environ.get("CI"):
            pytest.fail(f"CI needs RabbitMQ at {url}, and nothing answers there")
        pytest.skip(f"no RabbitMQ at {url} (set CONVEYOR_AMQP_URL)")
    return url


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
