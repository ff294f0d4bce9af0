"""Fixtures for the RabbitMQ-only tests: transports that clean up after themselves, and
the management API (to close connections from the broker's side)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.errors import TransportError
from workers.amqp import AmqpSettings, AmqpTransport


class Rabbit:
    """Connects transports to the test broker and deletes what the test declared."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.prefix = f"t.amqp.{uuid.uuid4().hex[:10]}"
        self.names: list[str] = []
        self.transports: list[AmqpTransport] = []

    def name(self, suffix: str) -> str:
        full = f"{self.prefix}.{suffix}"
        self.names.append(full)
        return full

    def settings(self, **overrides: Any) -> AmqpSettings:
        return AmqpSettings.from_url(self.url, **overrides)

    async def connect(self, **overrides: Any) -> AmqpTransport:
        transport = await AmqpTransport.connect(self.settings(**overrides))
        self.transports.append(transport)
        return transport

    async def cleanup(self) -> None:
        admin = await AmqpTransport.connect(self.url)
        for name in self.names:
            for delete in (admin.delete_queue, admin.delete_exchange):
                with contextlib.suppress(TransportError):
                    await delete(name)
        for transport in [*self.transports, admin]:
            await transport.close(grace=0.5)


@pytest.fixture
async def rabbit(rabbitmq_url: str) -> AsyncIterator[Rabbit]:
    handle = Rabbit(rabbitmq_url)
    try:
        yield handle
    finally:
        await handle.cleanup()


class Management:
    """The bits of the RabbitMQ management HTTP API these tests use."""

    def __init__(self, amqp_url: str) -> None:
        parts = urllib.parse.urlsplit(amqp_url)
        port = os.environ.get("CONVEYOR_RABBITMQ_MANAGEMENT_PORT", "15672")
        self.base = f"http://{parts.hostname or '127.0.0.1'}:{port}/api"
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        self._auth = base64.b64encode(f"{user}:{password}".encode()).decode()

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(f"{self.base}{path}", method=method)
        request.add_header("Authorization", f"Basic {self._auth}")
        with urllib.request.urlopen(request, timeout=5) as response:
            body = response.read()
        return json.loads(body) if body else None

    def answers(self) -> bool:
        try:
            self._call("GET", "/overview")
        except (OSError, urllib.error.URLError):
            return False
        return True

    def connection_names(self, client_name: str) -> list[str]:
        connections = self._call("GET", "/connections?columns=name,client_properties")
        return [
            c["name"]
            for c in connections
            if c.get("client_properties", {}).get("connection_name") == client_name
        ]

    async def close_connection(self, client_name: str) -> None:
        """Close (from the broker) the connection whose client name is ``client_name``."""
        async with asyncio.timeout(10.0):
            while True:
                names = await asyncio.to_thread(self.connection_names, client_name)
                if names:
                    break
                # the management API lists a new connection after its first stats event
                await asyncio.sleep(0.2)
        for name in names:
            quoted = urllib.parse.quote(name, safe="")
            await asyncio.to_thread(self._call, "DELETE", f"/connections/{quoted}")


@pytest.fixture
def management(rabbitmq_url: str) -> Management:
    api = Management(rabbitmq_url)
    if not api.answers():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the RabbitMQ management API at {api.base}")
        pytest.skip(f"no RabbitMQ management API at {api.base}")
    return api
