"""End-to-end serving benchmark: W1 (MLP split in 3) and W2 (MobileNetV2 split in 2).

    python -m bench.bench_pipeline [--seconds 6] [--rounds 2] [--no-rabbitmq] [--only W1]

Batch-1 requests, 16 in flight, through the client SDK. Each measurement runs in a process
of its own (so peak memory belongs to it, and TensorFlow, needed only to build the
models, is never loaded in a measured process):

* baseline: one in-process onnxruntime session of the whole model fed stacked batches of
  16, with as many intra-op threads as the pipeline uses in total (the CPU count);
* brokerless: client and every stage in one process on the embedded broker;
* rabbitmq: one ``python -m conveyor worker`` process per stage (threads split so the
  total matches the baseline) and the client in the measuring process.

"vs base" is the median over rounds of each run's throughput divided by the mean of
the two baselines measured just before and after it (the machine is shared).

Targets (issue 4): W2 >= 90% of the baseline on brokerless, >= 80% on RabbitMQ;
W1 >= 10,000 requests/s on brokerless, >= 2,000 on RabbitMQ.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: Requests in flight (the issue fixes 16; the variable exists for diagnosis only).
CONCURRENCY = int(os.environ.get("CONVEYOR_BENCH_CONCURRENCY", "16"))
WORKLOADS = {
    # name: (model, split stages, input shape without batch)
    "W1": ("mlp", 3, (784,)),
    "W2": ("mobilenetv2", 2, (224, 224, 3)),
}
TARGETS = {
    ("W1", "brokerless"): ("req/s", 10_000.0),
    ("W1", "rabbitmq"): ("req/s", 2_000.0),
    ("W2", "brokerless"): ("of baseline", 0.90),
    ("W2", "rabbitmq"): ("of baseline", 0.80),
    ("W1", "rabbitmq-1proc"): ("req/s", 2_000.0),
    ("W2", "rabbitmq-1proc"): ("of baseline", 0.80),
}


# -- preparing the models (the only step that imports TensorFlow) ------------------------------


def prepare(cache: Path, workloads: list[str], profile: bool) -> None:
    import onnx

    from converter import convert
    from converter.export import load_model
    from conveyor.app.demo import build_mlp

    for name in workloads:
        kind, stages, _ = WORKLOADS[name]
        root = cache / name
        if (root / "plan" / "plan.json").exists():
            continue
        root.mkdir(parents=True, exist_ok=True)
        if kind == "mlp":
            model = build_mlp(0)
        else:
            import keras

            keras.utils.set_random_seed(0)
            model = keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None)
        onnx.save(load_model(model), str(root / "whole.onnx"))
        # profile: balance measured onnxruntime time per node, not FLOPs (MobileNetV2's
        # early depthwise layers are memory-bound: FLOPs put the cut far off the middle).
        convert(root / "whole.onnx", root / "plan", by="layer", stages=stages,
                profile=profile)


# -- measuring ----------------------------------------------------------------------------


def peak_rss_mib(pid: int | None = None) -> float:
    """VmHWM of a process (this one by default), in MiB."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_requests(plan: Any, n: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    spec = plan.inputs[0]
    shape = tuple(int(d) for d in spec.shape[1:])
    return [{spec.name: rng.random((1, *shape), dtype=np.float32)} for _ in range(n)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_pid() -> int | None:
    """RabbitMQ's Erlang VM on this machine, if any (its CPU counts for the pipeline)."""
    out = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else None


async def drive(client: Any, requests: list[dict[str, np.ndarray]], seconds: float,
                warmup: int, pids: dict[str, int] | None = None) -> dict[str, Any]:
    """``CONCURRENCY`` lanes of batch-1 requests for ``seconds`` after ``warmup`` requests.

    Also the CPU milliseconds per request of this process and of ``pids`` during the
    measured seconds: unlike throughput, it hardly depends on what else the machine runs.
    """
    async def lanes(until: float | None, count: int | None, lat: list[float]) -> None:
        sent = 0

        async def lane(offset: int) -> None:
            nonlocal sent
            i = offset
            while (until is None or time.perf_counter() < until) and (
                count is None or sent < count
            ):
                sent += 1
                start = time.perf_counter()
                await client.infer(requests[i % len(requests)], timeout=60.0)
                lat.append(time.perf_counter() - start)
                i += CONCURRENCY

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(lane(k)) for k in range(CONCURRENCY)]
        del tasks

    await lanes(None, warmup, [])
    watched = {"this process": os.getpid(), **(pids or {})}
    cpu_before = {k: cpu_seconds(p) for k, p in watched.items()}
    latencies: list[float] = []
    start = time.perf_counter()
    await lanes(start + seconds, None, latencies)
    elapsed = time.perf_counter() - start
    cpu = {k: cpu_seconds(p) - cpu_before[k] for k, p in watched.items()}
    lat = np.array(latencies)
    return {
        "requests": float(len(lat)),
        "seconds": elapsed,
        "throughput": len(lat) / elapsed,
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "cpu_ms_per_request": {k: round(v * 1e3 / len(lat), 4) for k, v in cpu.items()},
    }


def leg_baseline(cache: Path, name: str, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    from conveyor.plan import Plan

    plan = Plan.load(cache / name / "plan")
    threads = os.cpu_count() or 1
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(cache / name / "whole.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    reqs = make_requests(plan, CONCURRENCY)
    feed = {plan.inputs[0].name: np.concatenate([next(iter(r.values())) for r in reqs])}
    for _ in range(3):
        session.run(None, feed)
    batches = 0
    lat: list[float] = []
    cpu_start = cpu_seconds(os.getpid())
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        session.run(None, feed)
        lat.append(time.perf_counter() - t)
        batches += 1
    elapsed = time.perf_counter() - start
    cpu_ms = (cpu_seconds(os.getpid()) - cpu_start) * 1e3 / (batches * CONCURRENCY)
    return {
        "throughput": batches * CONCURRENCY / elapsed,
        "cpu_ms_per_request": {"this process": round(cpu_ms, 3)},
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "threads": threads,
        "peak_rss_mib": {"process": peak_rss_mib()},
    }


def pipeline_batch(plan: Any, max_batch: int | None, workload: str) -> int:
    """The stage batch limit a leg uses (``--max-batch`` wins).

    W2 is compute-bound: with 16 requests in flight and batches of 16, one batch holds
    every request and the stages take turns, so it uses 16 / K to let each stage run a
    batch at the same time. W1 is overhead-bound: fewer, fuller messages win, so it keeps
    the plan's limit (measured: 16 beats 5 on brokerless by ~1.6x).
    """
    if max_batch is not None:
        return max_batch
    if workload == "W2":
        return max(1, CONCURRENCY // len(plan.stages))
    return int(plan.scheduling.default.max_batch)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: The scraper's loop (a process of its own, see ``scraping``).
_SCRAPER = """
import sys, time, urllib.request
every = float(sys.argv[1])
while True:
    for port in sys.argv[2:]:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            pass  # not up yet
    time.sleep(every)
"""


@contextlib.contextmanager
def scraping(ports: list[int], every: float = 1.0) -> Iterator[None]:
    """What Prometheus does to a "metrics on" leg: GET /metrics of each port every
    ``every`` seconds, from a process of its own (as Prometheus is), so that the measured
    processes pay for serving a scrape and not for making one."""
    proc = subprocess.Popen([sys.executable, "-c", _SCRAPER, str(every), *map(str, ports)])
    try:
        yield
    finally:
        proc.terminate()
        proc.wait()


def leg_brokerless(cache: Path, name: str, seconds: float, max_batch: int | None,
                   max_delay_ms: float | None, batch_wait: str | None = None,
                   metrics: str = "on") -> dict[str, Any]:
    from conveyor.app.connect import connect
    from conveyor.plan import Plan
    from workers.settings import WorkerSettings

    plan = Plan.load(cache / name / "plan")
    batch = pipeline_batch(plan, max_batch, name)
    wait: dict[str, Any] = {} if batch_wait is None else {"batch_wait": batch_wait}
    options = {"settings": WorkerSettings(device="cpu", max_batch=batch,
                                          max_delay_ms=max_delay_ms, metrics=metrics == "on",
                                          **wait)}

    async def run() -> dict[str, Any]:
        from conveyor.app.observe import ObserveServer

        async with connect(None, plan=plan, timeout=60.0, worker_options=options) as client:
            server = None
            with contextlib.ExitStack() as stack:
                if metrics == "on":  # served and scraped each second, as in production
                    assert client.workers is not None
                    server = ObserveServer(0, host="127.0.0.1")
                    server.add_registry(client.workers.metrics.registry)
                    await server.start()
                    stack.enter_context(scraping([server.bound_port]))
                result: dict[str, Any] = await drive(client, make_requests(plan), seconds,
                                                     warmup=200 if name == "W1" else 32)
            result["stages"] = stage_report(client.workers)
            if server is not None:
                await server.stop()
        return result

    result = asyncio.run(run())
    result["peak_rss_mib"] = {"client + all stages": peak_rss_mib()}
    result["max_batch"] = batch
    return result


def stage_report(workers: Any) -> dict[str, dict[str, float]]:
    """Mean batch size and session time per request of each in-process stage."""
    stats = getattr(workers, "stats", None)
    if stats is None:
        return {}
    return {
        s.stage: {"mean_batch": round(s.mean_batch, 2),
                  "ms_per_request": round(s.service_ms_per_request, 3),
                  "batches": s.batches}
        for s in stats().stages
    }


def isolated_copy(plan: Any, directory: Path) -> Any:
    """The plan under a fresh name (hence fresh queues) so runs never share leftovers."""
    directory.mkdir(parents=True)
    for stage in plan.stages:
        shutil.copy2(plan.directory / stage.file, directory / stage.file)
    return dataclasses.replace(plan, name=f"{plan.name}-{uuid.uuid4().hex[:8]}",
                               hash="").save(directory)


def leg_rabbitmq(cache: Path, name: str, seconds: float, url: str, max_batch: int | None,
                 max_delay_ms: float | None, batch_wait: str | None = None,
                 one_process: bool = False, metrics: str = "on") -> dict[str, Any]:
    from conveyor.app.connect import connect
    from conveyor.plan import Plan

    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        plan = isolated_copy(Plan.load(cache / name / "plan"), Path(tmp) / "plan")
        threads = max(1, (os.cpu_count() or 1) // len(plan.stages))
        batch = pipeline_batch(plan, max_batch, name)
        # One worker process per stage, or (one_process) one hosting them all, which hands
        # batches between its stages in memory: only requests and replies cross RabbitMQ.
        groups = ({"all": plan.stage_names} if one_process
                  else {stage: [stage] for stage in plan.stage_names})
        procs, ports = start_workers(plan, groups, url, Path(tmp), metrics=metrics == "on",
                                     threads=threads, batch=batch, max_delay_ms=max_delay_ms,
                                     batch_wait=batch_wait)
        rss: dict[str, float] = {}
        try:
            async def run() -> dict[str, Any]:
                pids = {f"worker {k}": p.pid for k, p in procs.items()}
                broker = broker_pid()
                if broker is not None:
                    pids["rabbitmq"] = broker
                async with connect(url, plan=plan, timeout=60.0) as client:
                    result: dict[str, Any] = await drive(
                        client, make_requests(plan), seconds,
                        warmup=200 if name == "W1" else 32, pids=pids,
                    )
                    return result

            with scraping(ports) if ports else contextlib.nullcontext():
                result = asyncio.run(run())
            for stage, proc in procs.items():
                rss[f"worker {stage}"] = peak_rss_mib(proc.pid)
            rss["client"] = peak_rss_mib()
        except BaseException:
            for stage in procs:
                sys.stderr.write((Path(tmp) / f"{stage}.log").read_text()[-2000:])
            raise
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(30)
            asyncio.run(delete_topology(url, plan))
            batches = worker_batches(Path(tmp), list(groups))
    result["peak_rss_mib"] = rss
    result["stages"] = batches
    result["threads_per_worker"] = threads
    result["max_batch"] = batch
    return result


def start_workers(plan: Any, groups: dict[str, list[str]], url: str, logs: Path, *,
                  metrics: bool, threads: int, batch: int, max_delay_ms: float | None = None,
                  batch_wait: str | None = None) -> tuple[dict[str, Any], list[int]]:
    """``python -m conveyor worker`` processes, one per group of stages (logs in ``logs``),
    finding the broker in ``CONVEYOR_AMQP_URL``:
    with ``metrics``, each serves ``/metrics`` on a free port (the ports returned), else it
    runs ``--no-timings``."""
    procs: dict[str, Any] = {}
    ports: list[int] = []
    for name, hosted in groups.items():
        if metrics:
            ports.append(free_port())
        switch = ["--metrics-port", str(ports[-1])] if metrics else ["--no-timings"]
        with (logs / f"{name}.log").open("wb") as log:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "conveyor", "worker", str(plan.directory),
                 *[a for h in hosted for a in ("--stage", h)],
                 "--device", "cpu", "--threads", str(threads), "--max-batch", str(batch),
                 *(["--max-delay-ms", str(max_delay_ms)] if max_delay_ms is not None else []),
                 *(["--batch-wait", batch_wait] if batch_wait is not None else []),
                 *switch],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, "CONVEYOR_AMQP_URL": url},  # never on a command line
            )
    return procs, ports


def worker_batches(logs: Path, stages: list[str]) -> dict[str, dict[str, float]]:
    """Mean batch per stage from the workers' exit lines (``conveyor: stage S: ...``)."""
    found: dict[str, dict[str, float]] = {}
    for stage in stages:
        for line in (logs / f"{stage}.log").read_text(errors="replace").splitlines():
            m = re.match(r"conveyor: stage (\S+): (\d+) requests in (\d+) batches", line)
            if m and int(m.group(3)):
                found[m.group(1)] = {"mean_batch": round(int(m.group(2)) / int(m.group(3)), 2),
                                     "batches": int(m.group(3))}
    return found


async def delete_topology(url: str, plan: Any) -> None:
    from conveyor.topology import Topology
    from conveyor.topology_setup import stage_queues
    from workers.amqp import AmqpTransport

    topo = Topology.of(plan)
    admin = await AmqpTransport.connect(url)
    try:
        work = {q for s in plan.stages for q in stage_queues(plan, s)}
        for q in work | {topo.suspect_queue(q) for q in work} | {topo.dead_letter_queue}:
            await admin.delete_queue(q)
        for x in [topo.input_exchange, topo.control_exchange, topo.dead_letter_exchange,
                  *(topo.stage_exchange(s) for s in plan.stage_names)]:
            await admin.delete_exchange(x)
    finally:
        await admin.close(grace=0.5)


# -- orchestration ------------------------------------------------------------------------


def run_leg(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_pipeline", *args],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"leg {args} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per leg")
    p.add_argument("--broker", default=os.environ.get("CONVEYOR_AMQP_URL",
                                                      "amqp://guest:guest@127.0.0.1:5672/"))
    p.add_argument("--no-rabbitmq", action="store_true")
    p.add_argument("--rabbitmq-one-process", action="store_true",
                   help="also run a RabbitMQ leg with every stage in one worker process")
    p.add_argument("--rounds", type=int, default=2,
                   help="pipeline runs per leg, each between baselines (2)")
    p.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "conveyor-bench")
    p.add_argument("--max-batch", type=int, default=None,
                   help="stage batch limit (default: 16 in flight / number of stages)")
    p.add_argument("--max-delay-ms", type=float, default=None,
                   help="stage batching delay (default: the plan's schedule, 2 ms)")
    p.add_argument("--batch-wait", choices=["idle", "window"], default=None,
                   help="the workers' batch wait policy (default: theirs, idle)")
    p.add_argument("--cost", choices=["profile", "flops"], default="profile",
                   help="the converter's cost model for the split (profile)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--metrics", choices=["on", "off", "alternate"], default="on",
                   help="workers measure and serve metrics, scraped each second (on, the "
                   "default), do not measure (off), or both in alternating legs")
    p.add_argument("--leg", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workloads = args.only or sorted(WORKLOADS)

    if args.leg is not None:  # a measuring subprocess: print one JSON line
        if args.leg == "prepare":
            prepare(args.cache, workloads, profile=args.cost == "profile")
            result: dict[str, Any] = {"prepared": workloads}
        elif args.leg == "baseline":
            result = leg_baseline(args.cache, args.workload, args.seconds)
        elif args.leg == "brokerless":
            result = leg_brokerless(args.cache, args.workload, args.seconds, args.max_batch,
                                    args.max_delay_ms, args.batch_wait, args.metrics)
        else:
            result = leg_rabbitmq(args.cache, args.workload, args.seconds, args.broker,
                                  args.max_batch, args.max_delay_ms, args.batch_wait,
                                  one_process=args.leg == "rabbitmq-1proc",
                                  metrics=args.metrics)
        print(json.dumps(result))
        return 0

    args.cache = args.cache / args.cost
    common = ["--cache", str(args.cache), "--seconds", str(args.seconds), "--cost", args.cost]
    if args.max_batch is not None:
        common += ["--max-batch", str(args.max_batch)]
    if args.max_delay_ms is not None:
        common += ["--max-delay-ms", str(args.max_delay_ms)]
    if args.batch_wait is not None:
        common += ["--batch-wait", args.batch_wait]
    t = time.perf_counter()
    run_leg(["--leg", "prepare", *common, *[a for w in workloads for a in ("--only", w)]])
    print(f"models prepared in {time.perf_counter() - t:.0f} s (cache {args.cache})")
    # The machine is shared and its load swings: each workload runs its legs in rounds
    # (baseline, brokerless, rabbitmq, ..., baseline), and the table shows medians.
    pipeline_legs = ["brokerless"] + ([] if args.no_rabbitmq else ["rabbitmq"])
    if args.rabbitmq_one_process and not args.no_rabbitmq:
        pipeline_legs.append("rabbitmq-1proc")
    switches = ["off", "on"] if args.metrics == "alternate" else [args.metrics]
    pipeline_legs = [f"{leg}:{m}" for leg in pipeline_legs for m in switches]
    results: dict[str, dict[str, Any]] = {}
    for w in workloads:
        runs: dict[str, list[dict[str, Any]]] = {}
        order = []
        for i in range(args.rounds):
            # Alternating: on first in every other round, so neither side always runs
            # second (on a warmer, or busier, machine).
            legs = pipeline_legs if i % 2 == 0 else _swap_pairs(pipeline_legs, len(switches))
            order += ["baseline", *legs]
        order.append("baseline")
        for leg in order:
            kind, _, switch = leg.partition(":")
            extra = ["--broker", args.broker] if kind.startswith("rabbitmq") else []
            extra += ["--metrics", switch] if switch else []
            r = run_leg(["--leg", kind, "--workload", w, *common, *extra])
            runs.setdefault(leg, []).append(r)
            print(f"  {w} {leg}: {r['throughput']:,.0f} req/s", flush=True)
        bases = [r["throughput"] for r in runs["baseline"]]
        for leg, rs in runs.items():
            results[f"{w}/{leg}"] = median_run(rs)
            if leg != "baseline":
                # Round i ran between baselines i and i+1: the machine's load swings, so
                # each run is compared with the baselines around it.
                ratios = sorted(r["throughput"] / ((bases[i] + bases[i + 1]) / 2)
                                for i, r in enumerate(rs))
                results[f"{w}/{leg}"]["ratio_runs"] = ratios
                results[f"{w}/{leg}"]["ratio"] = float(np.median(ratios))
        if args.metrics == "alternate":
            for leg in {leg.partition(":")[0] for leg in pipeline_legs}:
                off, on = runs[f"{leg}:off"], runs[f"{leg}:on"]
                # Legs of one round ran back to back: compare within the round.
                pairs = [b["throughput"] / a["throughput"] for a, b in zip(off, on, strict=True)]
                results[f"{w}/{leg}:on"]["on_vs_off_runs"] = pairs
                print(f"  {w} {leg}: metrics on / off per round {[f'{r:.3f}' for r in pairs]}, "
                      f"median {float(np.median(pairs)):.3f}", flush=True)
    print_table(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _swap_pairs(legs: list[str], group: int) -> list[str]:
    """``legs`` with each run of ``group`` switches of one leg reversed."""
    return [leg for i in range(0, len(legs), group) for leg in reversed(legs[i:i + group])]


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, with every run's throughput attached."""
    ordered = sorted(runs, key=lambda r: r["throughput"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["throughput_runs"] = [r["throughput"] for r in runs]
    return chosen


def print_table(results: dict[str, dict[str, Any]]) -> None:
    print()
    print(f"{'workload':9} {'path':11} {'req/s':>9} {'vs base':>8} {'p50 ms':>8} "
          f"{'p99 ms':>8}  {'target':18} peak RSS (MiB)")
    for key, r in results.items():
        w, leg = key.split("/")
        base = results.get(f"{w}/baseline", {}).get("throughput")
        ratio = r.get("ratio", r["throughput"] / base if base else float("nan"))
        target = TARGETS.get((w, leg.partition(":")[0]))
        verdict = ""
        if target is not None:
            unit, goal = target
            value = r["throughput"] if unit == "req/s" else ratio
            shown = f"{goal:,.0f} req/s" if unit == "req/s" else f"{goal:.0%} of base"
            verdict = f">= {shown} {'ok' if value >= goal else 'MISSED'}"
        rss = ", ".join(f"{k} {v:.0f}" for k, v in r.get("peak_rss_mib", {}).items())
        if "max_batch" in r:
            rss += f"  [max_batch {r['max_batch']}]"
        if r.get("stages"):
            rss += "  [mean batch " + " / ".join(
                f"{k} {v['mean_batch']:.1f}" for k, v in r["stages"].items()) + "]"
        if "throughput_runs" in r:
            rss += "  [runs " + " / ".join(f"{t:,.0f}" for t in r["throughput_runs"]) + "]"
        if "cpu_ms_per_request" in r:
            cpu = r["cpu_ms_per_request"]
            rss += f"  [CPU ms/req {sum(cpu.values()):.3f}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in cpu.items()) + "]"
        if "ratio_runs" in r:
            rss += "  [vs neighbouring baselines " + " / ".join(
                f"{t:.0%}" for t in r["ratio_runs"]) + "]"
        print(f"{w:9} {leg:11} {r['throughput']:9,.0f} {ratio:8.0%} {r['p50_ms']:8.2f} "
              f"{r['p99_ms']:8.2f}  {verdict:18} {rss}")


if __name__ == "__main__":
    sys.exit(main())
