"""The control plane: the controller, the worker-side agent and the scheduling policies.

    from workers.control import Controller, ControlAgent, PolicyConfig

``controller`` (the scheduler: heartbeats and queue depths in, commands and binding changes
out), ``agent`` (the worker's side: heartbeats out, commands in) and the pure policies
(``policies``). It never imports the stage worker: anything ``Controllable`` can be driven.
docs/scheduling.md describes the whole.
"""

from workers.control.agent import ControlAgent, command_queue, declare_control_exchange
from workers.control.controller import Controller, heartbeat_queue, state_queue
from workers.control.policies import (
    POLICIES,
    Decision,
    MovePartition,
    MoveWorker,
    PolicyConfig,
    PolicyKind,
    SetPrefetch,
)

__all__ = [
    "POLICIES",
    "ControlAgent",
    "Controller",
    "Decision",
    "MovePartition",
    "MoveWorker",
    "PolicyConfig",
    "PolicyKind",
    "SetPrefetch",
    "command_queue",
    "declare_control_exchange",
    "heartbeat_queue",
    "state_queue",
]
