"""brokerless: an in-process asyncio broker with AMQP 0-9-1 semantics.

``Broker(max_bytes=...)`` holds exchanges and queues; ``broker.connect()`` returns a
``BrokerlessTransport`` implementing ``conveyor.transport.Transport``. See
docs/brokerless.md for the semantics and where they differ from RabbitMQ.
"""

from .broker import Broker, BrokerStatistics
from .queue import DeathReason, QueueStatistics
from .transport import BrokerlessConsumer, BrokerlessDelivery, BrokerlessTransport

__all__ = [
    "Broker",
    "BrokerStatistics",
    "BrokerlessConsumer",
    "BrokerlessDelivery",
    "BrokerlessTransport",
    "DeathReason",
    "QueueStatistics",
]
