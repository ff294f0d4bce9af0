"""``conveyor demo``: build a small Keras MLP, split it in 3, serve it and check every answer.

Keras builds the MLP 784-64-64-10 (seeded random weights), the converter writes the whole
model and a 3-stage layer split (its stage table is printed: what was cut where, the
balance), the client sends ``requests`` batch-1 requests with ``concurrency`` in flight
while the controller runs (``conveyor.app.demo_serving``), every answer is compared with
onnxruntime running the unsplit model, and the per-stage figures close the report. By
default all of it runs in one process on the embedded broker; with a RabbitMQ URL one
``conveyor worker`` process per stage serves it. Heavy libraries (TensorFlow,
onnxruntime) are imported inside the functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from conveyor.errors import ConfigError
from conveyor.plan import Plan

if TYPE_CHECKING:
    from conveyor.app.connect import LocalClient
    from conveyor.app.demo_serving import Served
    from conveyor.client import Client

#: Requests the demo serves by default: enough for the progress bar to mean something.
DEFAULT_REQUESTS = 20_000
#: Relative error allowed between a served answer and the whole model's output.
TOLERANCE = 1e-5


@dataclass(frozen=True)
class DemoResult:
    requests: int
    seconds: float
    latencies_s: tuple[float, ...]
    max_rel_err: float
    mismatches: int
    providers: tuple[str, ...]
    build_s: float
    convert_s: float
    #: Per-stage figures (stage, requests, batches, mean_batch, ms_per_request or None).
    stages: tuple[dict[str, Any], ...] = ()
    #: The controller's summary line.
    controller: str = ""

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if self.latencies_s else 0.0

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (0 when both are all zeros)."""
    got64 = np.asarray(got, dtype=np.float64)
    want64 = np.asarray(want, dtype=np.float64)
    if got64.shape != want64.shape:
        return float("inf")
    scale = float(np.max(np.abs(want64))) if want64.size else 0.0
    diff = float(np.max(np.abs(got64 - want64))) if want64.size else 0.0
    return diff / scale if scale > 0 else diff


def build_mlp(seed: int = 0) -> Any:
    """The Keras MLP 784-64-64-10 (Dense/ReLU/softmax), seeded random weights."""
    # TensorFlow's C++ start-up chatter is not the user's business here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape=(784,), name="pixels"),
            keras.layers.Dense(64, activation="relu", name="hidden1"),
            keras.layers.Dense(64, activation="relu", name="hidden2"),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ],
        name="mlp",
    )


def convert_model(model: Any, workdir: Path, *, stages: int) -> tuple[Path, Plan]:
    """Export ``model`` once: the whole ONNX model (the reference) and its layer split."""
    import onnx

    from converter import convert
    from converter.export import load_model

    proto = load_model(model)
    whole = workdir / "whole.onnx"
    onnx.save(proto, str(whole))
    plan: Plan = convert(
        proto, workdir / f"layer-{stages}", by="layer", stages=stages, name=model.name
    )
    return whole, plan


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Silence C++ log lines (TensorFlow, absl) written straight to fd 2.

    Python exceptions still propagate; only native chatter during the block is dropped.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Reference:
    """onnxruntime on the unsplit model: the answers the pipeline must reproduce."""

    def __init__(self, onnx_path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(onnx_path), opts, providers=["CPUExecutionProvider"]
        )
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs, strict=True))


class ProgressBar:
    """A plain ``[#####.....] 420/1000`` bar on a terminal stream; silent when not a TTY."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 40) -> None:
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.done = 0
        self._shown = -1
        self.enabled = self.stream.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        filled = self.width * self.done // self.total
        if self.enabled and (filled != self._shown or self.done == self.total):
            self._shown = filled
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r  [{bar}] {self.done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


async def send_all(
    client: Client,
    requests: list[dict[str, np.ndarray]],
    *,
    concurrency: int,
    timeout: float = 30.0,  # noqa: ASYNC109 (per request, passed to infer)
    on_done: Callable[[], None] | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """Send every request with ``concurrency`` in flight; outputs and latencies, in order."""
    results: list[dict[str, np.ndarray]] = [{} for _ in requests]
    latencies = [0.0] * len(requests)
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < len(requests):
            i = next_index
            next_index += 1
            start = time.perf_counter()
            results[i] = await client.infer(requests[i], timeout=timeout)
            latencies[i] = time.perf_counter() - start
            if on_done is not None:
                on_done()

    async with asyncio.TaskGroup() as group:
        lanes = [group.create_task(lane()) for _ in range(min(concurrency, len(requests)))]
    del lanes
    return results, latencies


def served_providers(client: LocalClient) -> tuple[str, ...]:
    """Execution providers the in-process workers' sessions got (as they report them)."""
    workers = client.workers
    if workers is None:
        return ()
    return tuple(dict.fromkeys(p for p in workers.providers.values() if p))


async def serve_and_check(
    plan: Plan,
    reference: Reference,
    x: np.ndarray,
    *,
    concurrency: int,
    progress: bool,
    broker: str | None = None,
    out: TextIO | None = None,
) -> tuple[int, float, Served]:
    """Serve ``x`` row by row (in-process, or on RabbitMQ at ``broker``) with the
    controller running; (mismatches, max rel err, what was served)."""
    from conveyor.app.demo_serving import serve_in_process, serve_on_rabbitmq

    input_name = plan.inputs[0].name
    requests = [{input_name: x[i : i + 1]} for i in range(len(x))]
    want = reference.run({input_name: x})

    async def send(client: Client, measured: bool) -> tuple[list[Any], list[float]]:
        if not measured:
            # Warm up first (session start, first batches of each size): not counted.
            return await send_all(client, requests[: 4 * concurrency], concurrency=concurrency)
        bar = ProgressBar(len(requests)) if progress else None
        try:
            return await send_all(client, requests, concurrency=concurrency,
                                  on_done=bar.advance if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()

    if broker is None:
        served = await serve_in_process(plan, send)
    else:
        served = await serve_on_rabbitmq(plan, broker, send, out or sys.stdout)
    worst = 0.0
    mismatches = 0
    for i, outputs in enumerate(served.outputs):
        errs = [
            relative_error(outputs.get(name, np.empty(0)), value[i : i + 1])
            for name, value in want.items()
        ]
        err = max(errs) if errs else float("inf")
        worst = max(worst, err)
        mismatches += err > TOLERANCE
    return mismatches, worst, served


def run_demo(
    *,
    requests: int = DEFAULT_REQUESTS,
    concurrency: int = 32,
    seed: int = 0,
    workdir: Path | None = None,
    progress: bool = True,
    out: TextIO | None = None,
    broker: str | None = None,
) -> DemoResult:
    """Build, convert, serve and check; print the report on ``out`` (default stdout).

    ``workdir`` keeps the plan (``workdir/layer-3``) and the whole model; ``broker`` (a
    RabbitMQ URL) serves with one worker process per stage instead of in-process.
    """
    out = sys.stdout if out is None else out
    if requests < 1:
        raise ConfigError(f"requests must be at least 1, got {requests}")
    with tempfile.TemporaryDirectory(prefix="conveyor-demo-") as tmp:
        root = workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        whole, plan, build_s, convert_s = _build_and_split(seed, root, out)
        rng = np.random.default_rng(seed)
        spec = plan.inputs[0]
        x = rng.random((requests, *[int(d) for d in spec.shape[1:]]), dtype=np.float32)
        reference = Reference(whole)
        where = "the embedded broker" if broker is None else "RabbitMQ, one worker per stage"
        print(
            f"serving {requests} requests on {where} ({concurrency} in flight), "
            "controller running ...",
            file=out,
            flush=True,
        )
        mismatches, worst, served = asyncio.run(
            serve_and_check(plan, reference, x, concurrency=concurrency, progress=progress,
                            broker=broker, out=out)
        )
        if workdir is not None:
            print(f"plan kept in {plan.directory} (serve it: conveyor gateway "
                  f"{plan.directory})", file=out)
    result = DemoResult(
        requests=requests,
        seconds=served.seconds,
        latencies_s=tuple(served.latencies),
        max_rel_err=worst,
        mismatches=mismatches,
        providers=served.providers,
        build_s=build_s,
        convert_s=convert_s,
        stages=tuple(served.stages),
        controller=served.controller,
    )
    print_result(result, out)
    return result


def _build_and_split(seed: int, root: Path, out: TextIO) -> tuple[Path, Plan, float, float]:
    """The Keras MLP built, converted and split in 3 under ``root``; its stage table
    printed. Returns the whole model, the plan and the build and convert seconds."""
    from converter.report import stage_table

    t0 = time.perf_counter()
    print("building the Keras MLP 784-64-64-10 ...", file=out, flush=True)
    with quiet_native_stderr():
        model = build_mlp(seed)
    t1 = time.perf_counter()
    print("converting to ONNX and splitting into 3 stages by layer ...", file=out, flush=True)
    with quiet_native_stderr():
        whole, plan = convert_model(model, root, stages=3)
    t2 = time.perf_counter()
    print(f"plan {plan.name!r} ({plan.short_hash}): stages "
          + " -> ".join(s.name for s in plan.stages), file=out, flush=True)
    print(stage_table(plan), file=out, flush=True)
    return whole, plan, t1 - t0, t2 - t1


def print_result(r: DemoResult, out: TextIO) -> None:
    status = "all match" if r.ok else f"{r.mismatches} MISMATCH(ES)"
    print(
        f"answers:    {r.requests - r.mismatches}/{r.requests} match the whole model "
        f"(max rel err {r.max_rel_err:.2e}, tolerance {TOLERANCE:.0e}): {status}",
        file=out,
    )
    print(f"throughput: {r.throughput:,.0f} requests/s ({r.seconds:.2f} s)", file=out)
    print(f"latency:    p50 {r.latency_ms(50):.2f} ms, p99 {r.latency_ms(99):.2f} ms", file=out)
    print(f"provider:   {', '.join(r.providers) or 'unknown'}", file=out)
    print(f"setup:      build {r.build_s:.1f} s, convert {r.convert_s:.1f} s", file=out)
    for s in r.stages:
        per = s.get("ms_per_request")
        print(f"stage {s['stage']:<8} {s['requests']:>7,} requests in {s['batches']:>6,} "
              f"batches (mean batch {s['mean_batch']:.2f})"
              + (f", {per:.3f} ms session time per request" if per is not None else ""),
              file=out)
    if r.controller:
        print(r.controller, file=out)
