"""Deployment fixtures: a real two-stage plan (y = 3x + 1, then again), a 4-stage plan with a
join (no stage files needed by the generators), and a management-API helper for RabbitMQ
vhosts and users made per test."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.plan import (
    MODEL_INPUT,
    Plan,
    Scheduling,
    StageCost,
    StageInput,
    StageOutput,
    StageSchedule,
    StageSpec,
    TensorSpec,
)


def _scale_model(path: Path, inp: str, out: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(
        [helper.make_node("Mul", [inp, "three"], ["x3"], name="mul"),
         helper.make_node("Add", ["x3", "one"], [out], name="add")],
        "scale", [x], [y],
        initializer=[numpy_helper.from_array(np.array(3, np.float32), "three"),
                     numpy_helper.from_array(np.array(1, np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def chain_plan(root: Path, name: str | None = None) -> Plan:
    """Two stages ``a`` (x -> y) and ``b`` (y -> z), each 3t + 1, saved in ``root`` under a
    unique name: z = 9x + 4."""
    root.mkdir(parents=True, exist_ok=True)
    specs = []
    for i, stage in enumerate(("a", "b")):
        inp, out = "xyz"[i], "xyz"[i + 1]
        _scale_model(root / f"{stage}.onnx", inp, out)
        t_in = TensorSpec(inp, "float32", ("batch", 3))
        t_out = TensorSpec(out, "float32", ("batch", 3))
        source = MODEL_INPUT if i == 0 else "a"
        specs.append(StageSpec(stage, f"{stage}.onnx", (StageInput(t_in, source),),
                               (StageOutput(t_out, ("b",) if i == 0 else (), i == 1),),
                               cost=StageCost(nodes=2, flops=6e6 * (i + 1), share=(i + 1) / 3)))
    plan = Plan(name=name or f"t{uuid.uuid4().hex[:10]}", opset=17,
                inputs=(specs[0].inputs[0].tensor,), outputs=(specs[1].outputs[0].tensor,),
                stages=tuple(specs))
    return plan.save(root)


def join_plan(workers: int = 2, hash: str = "0123456789abcdef" * 4) -> Plan:
    """``head`` -> (``left``, ``right``) -> ``join`` (a join with ``workers`` shards)."""
    t = TensorSpec("t", "float32", ("batch", 4))

    def spec(name: str, sources: tuple[str, ...], consumers: tuple[str, ...], out: bool,
             share: float) -> StageSpec:
        return StageSpec(
            name, f"{name}.onnx",
            tuple(StageInput(TensorSpec(f"{s}_t", "float32", ("batch", 4)), s) for s in sources),
            (StageOutput(TensorSpec(f"{name}_t", "float32", ("batch", 4)), consumers, out),),
            cost=StageCost(nodes=3, flops=2e9 * share, param_bytes=int(4e8 * share), share=share),
        )

    head = StageSpec("head", "head.onnx", (StageInput(t, MODEL_INPUT),),
                     (StageOutput(TensorSpec("head_t", "float32", ("batch", 4)),
                                  ("left", "right")),),
                     cost=StageCost(nodes=3, flops=1e9, param_bytes=10**8, share=0.25))
    stages = (head, spec("left", ("head",), ("join",), False, 0.3),
              spec("right", ("head",), ("join",), False, 0.25),
              spec("join", ("left", "right"), (), True, 0.2))
    sched = Scheduling(stages={"join": StageSchedule(workers=workers),
                               "left": StageSchedule(workers=3)})
    return Plan(name="four", opset=17, inputs=(t,), outputs=(stages[-1].outputs[0].tensor,),
                stages=stages, scheduling=sched, hash=hash)


@dataclass
class Management:
    """RabbitMQ's management HTTP API as the administrator guest (tests only)."""

    base: str
    auth: str

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Authorization": self.auth,
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    @staticmethod
    def quote(name: str) -> str:
        return urllib.parse.quote(name, safe="")


@pytest.fixture
def management(rabbitmq_url: str) -> Management:
    parts = urllib.parse.urlsplit(rabbitmq_url)
    user, password = parts.username or "guest", parts.password or "guest"
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    m = Management(f"http://{parts.hostname or '127.0.0.1'}:15672/api", auth)
    try:
        m.call("GET", "/overview")
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"no RabbitMQ management API at {m.base}: {exc}")
    return m


@pytest.fixture
def vhost(management: Management) -> Iterator[str]:
    """A vhost of the test's own (deleted after it, with every user the test made)."""
    name = f"conveyor-test-{uuid.uuid4().hex[:8]}"
    management.call("PUT", f"/vhosts/{management.quote(name)}")
    try:
        yield name
    finally:
        management.call("DELETE", f"/vhosts/{management.quote(name)}")
