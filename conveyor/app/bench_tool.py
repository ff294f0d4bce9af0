"""``conveyor bench``'s measuring core: closed-loop sweeps and open-loop rates over any
``infer`` coroutine (the SDK's ``Client.infer``, or an HTTP call to ``conveyor gateway``).

    points = await sweep(client.infer, requests, concurrencies=[1, 4, 16], seconds=5)

A closed-loop point keeps ``concurrency`` requests in flight for ``seconds`` (after a
short warm-up that is not counted); an open-loop point sends ``rate`` requests per second
on a fixed schedule whatever the answers do, so latency includes the queueing an
overloaded pipeline builds up. Failed requests are counted by error type, not raised.
Latencies are measured from the send to the answer, in the sending process.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from conveyor.errors import ConfigError, ConveyorError
from conveyor.plan import Plan

Inputs = Mapping[str, np.ndarray]
InferFn = Callable[[Inputs], Awaitable[Any]]
#: Called after every answer (progress bars); argument: answers so far in this point.
OnDone = Callable[[int], None]
#: An open-loop point refuses to keep more than this many requests waiting for answers.
MAX_OPEN_IN_FLIGHT = 10_000


@dataclass(frozen=True)
class Point:
    """One measured load level."""

    mode: str  # "concurrency" | "rate"
    level: float
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    error_kinds: dict[str, int] = field(default_factory=dict)
    #: CPU time of the measuring process (all its threads: in-process workers included)
    #: per request: on a shared machine it moves far less than throughput does.
    cpu_ms_per_request: float = 0.0
    #: The per-stage split during this level, from the metrics (``conveyor.app.bench_split``;
    #: empty when no metrics were readable).
    stages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        """``c16`` for a closed-loop level, ``rate 2000`` for an open-loop one."""
        return level_label(self.mode, self.level)

    @property
    def throughput(self) -> float:
        """Answered requests (errors excluded) per second."""
        return (self.requests - self.errors) / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput"] = round(self.throughput, 2)
        return d


def random_inputs(plan: Plan, batch: int = 1, count: int = 16, seed: int = 0) -> list[Inputs]:
    """``count`` requests of ``batch`` rows drawn from the plan's input specs (symbolic
    dimensions past the first are 1)."""
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}")
    rng = np.random.default_rng(seed)
    made: list[Inputs] = []
    for _ in range(count):
        one: dict[str, np.ndarray] = {}
        for spec in plan.inputs:
            shape = tuple(batch if axis == 0 and not isinstance(d, int) else
                          (d if isinstance(d, int) and d >= 0 else 1)
                          for axis, d in enumerate(spec.shape))
            one[spec.name] = _random_array(rng, spec.dtype, shape)
        made.append(one)
    return made


def _random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bool":
        return rng.random(shape) < 0.5
    if dtype.startswith(("int", "uint")):
        return rng.integers(0, 8, size=shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def level_label(mode: str, level: float) -> str:
    return f"{'c' if mode == 'concurrency' else 'rate '}{level:g}"


def parse_levels(text: str) -> list[int]:
    """``"1,4,16,64"`` -> [1, 4, 16, 64] (each at least 1)."""
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--concurrency takes integers like 1,4,16; got {text!r}") from None
    if not levels or min(levels) < 1:
        raise ConfigError(f"--concurrency levels must be at least 1, got {text!r}")
    return levels


class _Recorder:
    def __init__(self, on_done: OnDone | None) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.on_done = on_done

    async def send(self, infer: InferFn, inputs: Inputs) -> None:
        start = time.perf_counter()
        try:
            await infer(inputs)
        except ConveyorError as exc:
            self.errors[type(exc).__name__] += 1
        self.latencies.append(time.perf_counter() - start)
        if self.on_done is not None:
            self.on_done(len(self.latencies))

    def point(self, mode: str, level: float, seconds: float, cpu_s: float) -> Point:
        lat = np.array(self.latencies) * 1e3 if self.latencies else np.zeros(1)
        p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
        n = len(self.latencies)
        return Point(mode, level, n, sum(self.errors.values()), seconds,
                     round(p50, 3), round(p90, 3), round(p99, 3), dict(self.errors),
                     round(cpu_s * 1e3 / n, 3) if n else 0.0)


async def closed_loop(
    infer: InferFn, requests: Sequence[Inputs], concurrency: int, seconds: float,
    *, warmup: float = 0.0, on_done: OnDone | None = None,
) -> Point:
    """``concurrency`` lanes, each sending its next request when the last is answered."""
    if concurrency < 1 or seconds <= 0:
        raise ConfigError(f"need concurrency >= 1 and seconds > 0, got {concurrency}, {seconds}")
    if warmup > 0:
        await _lanes(infer, requests, concurrency, time.perf_counter() + warmup, _Recorder(None))
    recorder = _Recorder(on_done)
    cpu, start = time.process_time(), time.perf_counter()
    await _lanes(infer, requests, concurrency, start + seconds, recorder)
    return recorder.point("concurrency", concurrency, time.perf_counter() - start,
                          time.process_time() - cpu)


async def _lanes(infer: InferFn, requests: Sequence[Inputs], concurrency: int, until: float,
                 recorder: _Recorder) -> None:
    async def lane(k: int) -> None:
        i = k
        while time.perf_counter() < until:
            await recorder.send(infer, requests[i % len(requests)])
            i += concurrency

    async with asyncio.TaskGroup() as group:
        for k in range(concurrency):
            group.create_task(lane(k))


async def open_loop(
    infer: InferFn, requests: Sequence[Inputs], rate: float, seconds: float,
    *, on_done: OnDone | None = None,
) -> Point:
    """Send ``rate`` requests per second for ``seconds``, then wait for the answers."""
    if rate <= 0 or seconds <= 0:
        raise ConfigError(f"need rate > 0 and seconds > 0, got {rate}, {seconds}")
    recorder = _Recorder(on_done)
    tasks: set[asyncio.Task[None]] = set()
    total = max(1, math.floor(rate * seconds))
    cpu, start = time.process_time(), time.perf_counter()
    for i in range(total):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= MAX_OPEN_IN_FLIGHT:
            recorder.errors["Overloaded"] += 1
            continue
        task = asyncio.create_task(recorder.send(infer, requests[i % len(requests)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return recorder.point("rate", rate, time.perf_counter() - start, time.process_time() - cpu)


async def sweep(
    infer: InferFn, requests: Sequence[Inputs], *, concurrencies: Iterable[int] = (),
    rate: float | None = None, seconds: float = 5.0, warmup: float = 0.5,
    on_point: Callable[[str, float], OnDone | None] | None = None,
) -> list[Point]:
    """Every closed-loop level in turn, or the one open-loop ``rate``."""
    points = []
    if rate is not None:
        done = on_point("rate", rate) if on_point else None
        await closed_loop(infer, requests, 1, warmup) if warmup > 0 else None
        points.append(await open_loop(infer, requests, rate, seconds, on_done=done))
        return points
    for level in concurrencies:
        done = on_point("concurrency", level) if on_point else None
        points.append(await closed_loop(infer, requests, level, seconds, warmup=warmup,
                                        on_done=done))
    return points


def format_table(points: Sequence[Point]) -> str:
    head = ["load", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"]
    rows = [[p.label, str(p.requests),
             f"{p.throughput:,.1f}", f"{p.p50_ms:.2f}", f"{p.p90_ms:.2f}", f"{p.p99_ms:.2f}",
             str(p.errors) + (f" ({_kinds(p.error_kinds)})" if p.errors else "")]
            for p in points]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True))
                     for r in [head, *rows])


def _kinds(kinds: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))


def plot(points: Sequence[Point], path: str, title: str) -> None:
    """The throughput-latency curve (p50 and p99 against req/s) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or the "
                          "conveyor[dev] extra)") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p.throughput for p in points]
    for q in ("p50", "p99"):
        ax.plot(x, [getattr(p, f"{q}_ms") for p in points], marker="o", label=q)
    for p in points:
        ax.annotate(f"{'c' if p.mode == 'concurrency' else 'r'}{p.level:g}",
                    (p.throughput, p.p99_ms), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
