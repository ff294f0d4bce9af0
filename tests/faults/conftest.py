"""Fault-suite fixtures: a RabbitMQ node of the suite's own, worker processes, a checker.

``rabbit_node`` boots one node per session on free ports under a temporary directory
(``tests.faults.node``) so that restarting or killing it disturbs no other test; it is
stopped and deleted at the end. Without ``rabbitmq-server`` installed the suite skips
with the reason, except in CI (``CI`` set), where it fails. Worker processes are
``python -m conveyor worker`` subprocesses that find the broker in ``CONVEYOR_AMQP_URL``
(never on their command line).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conveyor.app.demo import build_mlp
from conveyor.plan import Plan
from tests.faults.node import NodeError, RabbitNode, answers, find_scripts
from tests.support.cases import Case, Request, convert_case
from tests.support.plans import isolated_copy


@pytest.fixture(scope="session")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    scripts = find_scripts()
    if scripts is None:
        reason = "rabbitmq-server is not installed (the fault suite boots a node of its own)"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {reason}")
        pytest.skip(reason)
    node = RabbitNode(tmp_path_factory.mktemp("rabbit-node") / "node", scripts)
    try:
        node.start()
        yield node
    finally:
        node.shutdown()


@pytest.fixture
def node(rabbit_node: RabbitNode) -> RabbitNode:
    """The suite's node, booted again first if an earlier test left it down."""
    if not answers(rabbit_node.port):
        try:
            rabbit_node.start_app()
        except (NodeError, subprocess.TimeoutExpired):  # the Erlang node is gone: boot it
            rabbit_node.start()
    return rabbit_node


@pytest.fixture(scope="session")
def fault_mlp(tmp_path_factory: pytest.TempPathFactory) -> Case:
    def request(rng: Any) -> Request:
        return {"pixels": rng.random((1, 784), dtype="float32")}

    root = tmp_path_factory.mktemp("fault-models")
    return convert_case(build_mlp(0), root, "mlp", by="layer", stages=3, make_request=request)


@pytest.fixture
def fault_plan(fault_mlp: Case, tmp_path: Path) -> Plan:
    """The mlp plan under a name of this test's own (queues of its own)."""
    return isolated_copy(fault_mlp.plan, tmp_path / f"plan-{uuid.uuid4().hex[:8]}")
