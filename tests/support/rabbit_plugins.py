"""Does the RabbitMQ the tests use have the exchange plugins Conveyor needs?

The tests' RabbitMQ fixture calls ``missing_plugins(url)``: outside CI a broker without
them makes the RabbitMQ tests skip with the command that fixes it; in CI they fail.
"""

from __future__ import annotations

import uuid

#: Exchange type -> the plugin that provides it (as ``workers.amqp.transport`` names them).
NEEDED = {
    "x-consistent-hash": "rabbitmq_consistent_hash_exchange",
    "x-random": "rabbitmq_random_exchange",
}


def missing_plugins(url: str) -> list[str]:
    """The plugins whose exchange type the broker at ``url`` refuses (pika, blocking)."""
    import pika
    import pika.exceptions

    missing = []
    for kind, plugin in NEEDED.items():
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            channel = connection.channel()
            name = f"conveyor.plugin-check.{uuid.uuid4().hex[:8]}"
            channel.exchange_declare(name, exchange_type=kind, auto_delete=True)
            channel.exchange_delete(name)
        except pika.exceptions.ConnectionClosed as exc:
            if "exchange type" not in str(exc):
                raise
            missing.append(plugin)
        finally:
            if connection.is_open:
                connection.close()
    return missing


def fix_command(plugins: list[str]) -> str:
    return f"rabbitmq-plugins enable {' '.join(plugins)}"
