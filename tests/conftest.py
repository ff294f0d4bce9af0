"""Fixtures every suite may use, from tests/support: ``rabbitmq_url`` and ``broker``
(brokers.py), ``pipeline`` (pipeline.py). Registered here, once, as plugins, so no test
module imports a conftest."""

from __future__ import annotations

pytest_plugins = ["tests.support.brokers", "tests.support.pipeline"]
