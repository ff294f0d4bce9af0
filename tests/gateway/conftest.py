"""The gateway tests' plans and a gateway running in a thread of its own.

``tritonclient.http`` is a blocking (gevent) client, so the gateway runs on an event loop in
a background thread and the tests call it the way a Triton user would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from conveyor.app.gateway import GatewaySettings, RunningGateway
from conveyor.plan import MODEL_INPUT, Partitioning, Plan, StageInput, StageOutput, StageSpec
from conveyor.plan import TensorSpec as Spec

T = TypeVar("T")
WIDTH, HIDDEN, CLASSES = 8, 16, 4


def mlp_model() -> Any:
    """x [batch, 8], bias [batch, 4] -> logits = relu(x W1 + b1) W2 + b2 + bias, probs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.normal(size=(WIDTH, HIDDEN)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=HIDDEN).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="dense1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
        helper.make_node("Relu", ["h1"], ["h"], name="relu1"),
        helper.make_node("MatMul", ["h", "w2"], ["l0"], name="dense2"),
        helper.make_node("Add", ["l0", "b2"], ["l1"], name="bias2"),
        helper.make_node("Add", ["l1", "bias"], ["logits"], name="shift"),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", f, ["batch", WIDTH]),
         helper.make_tensor_value_info("bias", f, ["batch", CLASSES])],
        [helper.make_tensor_value_info("logits", f, ["batch", CLASSES]),
         helper.make_tensor_value_info("probs", f, ["batch", CLASSES])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@dataclass
class Served:
    """A plan, the whole model it was cut from (the reference) and its directory."""

    plan: Plan
    whole: Path
    reference: Any = field(default=None, repr=False)

    def expected(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.reference is None:
            from conveyor.app.demo import Reference

            self.reference = Reference(self.whole)
        result: dict[str, np.ndarray] = self.reference.run(inputs)
        return result


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """The MLP split in 2 by layer (random partitioning)."""
    import onnx

    from converter import convert

    root = tmp_path_factory.mktemp("gw-mlp")
    onnx.save(mlp_model(), str(root / "whole.onnx"))
    plan = convert(root / "whole.onnx", root / "plan", by="layer", stages=2, name="mlp")
    assert len(plan.stages) == 2
    return Served(plan, root / "whole.onnx")


@pytest.fixture(scope="session")
def hashed_mlp(tmp_path_factory: pytest.TempPathFactory, mlp: Served) -> Served:
    """The same MLP, hash-partitioned over one shard (requests need a partition key)."""
    from converter import convert

    root = tmp_path_factory.mktemp("gw-hashed")
    plan = convert(mlp.whole, root / "plan", by="layer", stages=2, name="mlph",
                   partitioning=Partitioning(kind="hash", shards=1))
    return Served(plan, mlp.whole)


@pytest.fixture(scope="session")
def broken_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """One stage that reshapes x [batch, 3] to [-1, 4]: onnxruntime fails on one row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("gw-broken")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "to"], ["y"], name="reshape")], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[numpy_helper.from_array(np.array([-1, 4], np.int64), "to")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(root / "broken.onnx"))
    xs, ys = Spec("x", "float32", ("batch", 3)), Spec("y", "float32", ("batch", 4))
    stage = StageSpec("broken", "broken.onnx", (StageInput(xs, MODEL_INPUT),),
                      (StageOutput(ys, (), model_output=True),))
    return Plan(name="broken", opset=17, inputs=(xs,), outputs=(ys,), stages=(stage,)).save(root)


class GatewayThread:
    """``serve_gateway`` on an event loop in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self, plan: Plan, settings: GatewaySettings, url: str | None = None) -> None:
        self.plan, self.settings, self.broker_url = plan, settings, url
        self.loop = asyncio.new_event_loop()
        self._started: concurrent.futures.Future[RunningGateway] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete,
                                        args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        from conveyor.app.gateway import serve_gateway
        from conveyor.app.transports import BrokerTarget

        self._stop = asyncio.Event()
        try:
            async with serve_gateway(self.plan, BrokerTarget(self.broker_url),
                                     self.settings) as running:
                self._started.set_result(running)
                await self._stop.wait()
        except BaseException as exc:
            if not self._started.done():
                self._started.set_exception(exc)
            raise

    def __enter__(self) -> RunningGateway:
        self._thread.start()
        return self._started.result(timeout=60)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self.loop.close()


@pytest.fixture(autouse=True)
def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVEYOR_AMQP_URL", raising=False)


@pytest.fixture(scope="module")
def mlp_gateway(mlp: Served) -> Iterator[RunningGateway]:
    with GatewayThread(mlp.plan, GatewaySettings(port=0, max_body_bytes=1 << 20)) as running:
        yield running
