"""End-to-end fixtures: real Keras models, converted once per session, served two ways.

``mlp``, ``mobilenet`` and ``branches`` are ``Case``s: a plan (the split model), the
unsplit ONNX model (the reference answers) and a request generator. ``pipeline`` serves a
case on brokerless (workers in this process) or on RabbitMQ (one ``python -m conveyor
worker`` subprocess per stage) and hands out a connected client. Each RabbitMQ test gets
its own copy of the plan under another name, hence its own queues, which are deleted at
the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.app.connect import connect
from conveyor.app.demo import Reference, build_mlp, relative_error
from conveyor.client import Client
from conveyor.plan import Plan

#: Relative error allowed between a served answer and the whole model's output.
TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[2]

Request = dict[str, np.ndarray]


@dataclass
class Case:
    name: str
    plan: Plan
    whole: Path
    make_request: Callable[[np.random.Generator], Request]
    _reference: Reference | None = field(default=None, repr=False)

    def requests(self, n: int, seed: int = 0) -> list[Request]:
        rng = np.random.default_rng(seed)
        return [self.make_request(rng) for _ in range(n)]

    def reference(self, request: Request) -> dict[str, np.ndarray]:
        if self._reference is None:
            self._reference = Reference(self.whole, threads=1)
        return self._reference.run(request)

    def check(self, request: Request, got: dict[str, np.ndarray]) -> float:
        """The worst relative error of ``got`` against the whole model; fails past tolerance."""
        want = self.reference(request)
        assert sorted(got) == sorted(want), f"{self.name}: outputs {sorted(got)} != {sorted(want)}"
        worst = max(relative_error(got[k], want[k]) for k in want)
        assert worst <= TOLERANCE, f"{self.name}: relative error {worst:.3g} > {TOLERANCE}"
        return worst


def convert_case(
    model: Any,
    root: Path,
    name: str,
    *,
    by: str,
    stages: int,
    make_request: Callable[[np.random.Generator], Request],
) -> Case:
    """Export ``model`` to one ONNX file (the reference) and split that file into a plan."""
    import onnx

    from converter import convert
    from converter.export import load_model

    whole = root / f"{name}.onnx"
    onnx.save(load_model(model), str(whole))
    plan = convert(whole, root / f"{name}-plan", by=by, stages=stages)
    return Case(name, plan, whole, make_request)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-models")


@pytest.fixture(scope="session")
def mlp(model_root: Path) -> Case:
    def request(rng: np.random.Generator) -> Request:
        return {"pixels": rng.random((1, 784), dtype=np.float32)}

    return convert_case(build_mlp(0), model_root, "mlp", by="layer", stages=3,
                        make_request=request)


@pytest.fixture(scope="session")
def mobilenet(model_root: Path) -> Case:
    import keras

    keras.utils.set_random_seed(1)
    # 96x96 keeps the suite fast on 2 cores; the graph is the same as at 224x224.
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10)

    def request(rng: np.random.Generator) -> Request:
        return {"input_layer": rng.random((1, 96, 96, 3), dtype=np.float32)}

    case = convert_case(model, model_root, "mobilenet", by="layer", stages=2,
                        make_request=request)
    return _rename_single_input(case)


@pytest.fixture(scope="session")
def branches(model_root: Path) -> Case:
    """A functional model with two parallel branches joined at the end (fan-out + join)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(2)
    x = keras.Input(shape=(32,), name="features")
    left = layers.Dense(48, activation="relu", name="left_dense1")(x)
    left = layers.Dense(16, activation="relu", name="left_dense2")(left)
    right = layers.Dense(40, activation="tanh", name="right_dense1")(x)
    right = layers.Dense(16, activation="tanh", name="right_dense2")(right)
    joined = layers.Concatenate(name="join_concat")([left, right])
    out = layers.Dense(8, activation="softmax", name="join_out")(joined)
    model = keras.Model(x, out, name="branches")

    def request(rng: np.random.Generator) -> Request:
        return {"features": rng.standard_normal((1, 32)).astype(np.float32)}

    return convert_case(model, model_root, "branches", by="function", stages=3,
                        make_request=request)


def _rename_single_input(case: Case) -> Case:
    """Keras names the input of applications models itself; use whatever the plan says."""
    name = case.plan.inputs[0].name
    make = case.make_request

    def request(rng: np.random.Generator) -> Request:
        return {name: next(iter(make(rng).values()))}

    return dataclasses.replace(case, make_request=request)


# -- serving -------------------------------------------------------------------------------


def isolated_copy(plan: Plan, directory: Path) -> Plan:
    """The same stages under another plan name: another hash, so queues of its own."""
    directory.mkdir(parents=True)
    assert plan.directory is not None
    for stage in plan.stages:
        shutil.copy2(plan.directory / stage.file, directory / stage.file)
    renamed = dataclasses.replace(plan, name=f"{plan.name}-{uuid.uuid4().hex[:8]}", hash="")
    return renamed.save(directory)


class WorkerProcesses:
    """``python -m conveyor worker`` subprocesses on RabbitMQ, one or more per stage."""

    def __init__(self, plan: Plan, url: str, log_dir: Path, *extra_args: str) -> None:
        self.plan = plan
        self.url = url
        self.log_dir = log_dir
        self.extra_args = extra_args
        self.procs: dict[str, list[subprocess.Popen[bytes]]] = {}

    def start(self, stage: str) -> subprocess.Popen[bytes]:
        index = len(self.procs.get(stage, []))
        log = (self.log_dir / f"worker-{stage}-{index}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor", "worker", str(self.plan.directory),
             "--stage", stage, "--broker", self.url, "--device", "cpu", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
        )
        log.close()
        self.procs.setdefault(stage, []).append(proc)
        return proc

    def start_all(self) -> None:
        for stage in self.plan.stage_names:
            self.start(stage)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.glob("worker-*.log"))
        )

    def stop_all(self, timeout: float = 20.0) -> None:
        live = [p for ps in self.procs.values() for p in ps if p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        for p in live:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


async def wait_until_consumed(url: str, plan: Plan, procs: WorkerProcesses,
                              timeout: float = 180.0) -> None:  # noqa: ASYNC109
    """Return once every queue of the plan has a consumer (workers up), or fail.

    Requests published earlier would wait in the queues anyway; waiting keeps worker
    start-up (seconds on a loaded 2-core machine) out of the requests' deadlines.
    """
    from conveyor.topology_setup import stage_queues
    from workers.amqp import AmqpTransport

    queues = [q for s in plan.stages for q in stage_queues(plan, s)]
    admin = await AmqpTransport.connect(url)
    give_up = time.monotonic() + timeout
    try:
        while True:
            idle = [q for q in queues if await consumers(admin, q) == 0]
            if not idle:
                return
            dead = {s: p.returncode for s, ps in procs.procs.items() for p in ps
                    if p.poll() is not None}
            if dead or time.monotonic() > give_up:
                raise AssertionError(
                    f"workers not consuming {idle} (exited: {dead})\n{procs.logs()}"
                )
            await asyncio.sleep(0.1)  # polling the broker's consumer counts
    finally:
        await admin.close(grace=0.5)


async def consumers(admin: Any, queue: str) -> int:
    """Consumers of ``queue``; 0 while it is not declared yet."""
    from conveyor.errors import TransportError

    try:
        return int((await admin.queue_stats(queue)).consumers)
    except TransportError:
        return 0


async def delete_topology(url: str, plan: Plan) -> None:
    from conveyor.topology import Topology
    from conveyor.topology_setup import stage_queues
    from workers.amqp import AmqpTransport

    topo = Topology.of(plan)
    queues = {q for s in plan.stages for q in stage_queues(plan, s)} | {topo.dead_letter_queue}
    exchanges = {topo.input_exchange, topo.control_exchange, topo.dead_letter_exchange}
    exchanges |= {topo.stage_exchange(s) for s in plan.stage_names}
    admin = await AmqpTransport.connect(url)
    try:
        for q in queues:
            await admin.delete_queue(q)
        for x in exchanges:
            await admin.delete_exchange(x)
    finally:
        await admin.close(grace=0.5)


@dataclass
class Served:
    client: Client
    plan: Plan
    workers: WorkerProcesses | None


class Pipeline:
    """Serves a case on one transport kind: ``async with pipeline.serve(case) as served``."""

    def __init__(self, kind: str, url: str | None, tmp: Path) -> None:
        self.kind = kind
        self.url = url
        self.tmp = tmp

    @contextlib.asynccontextmanager
    async def serve(
        self,
        case: Case,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
        start_workers: bool = True,
        pack: bool = True,
    ) -> AsyncIterator[Served]:
        if self.kind == "brokerless":
            async with connect(None, plan=case.plan, timeout=timeout,
                               local_workers=start_workers, pack=pack) as client:
                yield Served(client, case.plan, None)
            return
        assert self.url is not None
        plan = isolated_copy(case.plan, self.tmp / f"plan-{uuid.uuid4().hex[:8]}")
        procs = WorkerProcesses(plan, self.url, self.tmp)
        try:
            async with connect(self.url, plan=plan, timeout=timeout, pack=pack) as client:
                if start_workers:
                    procs.start_all()
                    await wait_until_consumed(self.url, plan, procs)
                yield Served(client, plan, procs)
        except BaseException:
            print(procs.logs(), file=sys.stderr)
            raise
        finally:
            await asyncio.to_thread(procs.stop_all)
            await delete_topology(self.url, plan)


@pytest.fixture(params=["brokerless", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def pipeline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pipeline]:
    url = request.getfixturevalue("rabbitmq_url") if request.param == "rabbitmq" else None
    yield Pipeline(request.param, url, tmp_path)
