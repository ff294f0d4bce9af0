"""The RabbitMQ transport (``conveyor.transport.Transport`` over aio-pika).

``transport`` (``AmqpTransport``; the mapping onto RabbitMQ is in its docstring),
``consumer`` (consumers and deliveries), ``convert`` (records to AMQP frames and
arguments), ``errors`` (aiormq errors to ``conveyor.errors``), ``settings``
(``AmqpSettings``), and the faster byte paths behind one switch: ``speedups`` (the gate),
``writer``, ``reader`` and ``frames``. Only ``conveyor.*`` of ours is imported here.
"""

from workers.amqp.consumer import AmqpConsumer, AmqpDelivery, ConsumerState, Settlement
from workers.amqp.settings import AmqpSettings
from workers.amqp.transport import AmqpTransport, TransportState

__all__ = [
    "AmqpConsumer",
    "AmqpDelivery",
    "AmqpSettings",
    "AmqpTransport",
    "ConsumerState",
    "Settlement",
    "TransportState",
]
