"""The application: the only package that wires Conveyor's components together.

``transports`` chooses RabbitMQ or the embedded broker (and reads ``CONVEYOR_AMQP_URL``),
``connect`` builds the client SDK's convenience, ``cli`` registers every command
(``cmd_*`` modules), ``demo`` is the README's main job. The contracts in ``conveyor``
outside this package import no component; components import only those contracts.
"""
