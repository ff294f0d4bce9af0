"""Metrics on vs off on the embedded broker, interleaved in one process (issue 13).

    python -m bench.bench_metrics [--workload W1] [--seconds 1] [--rounds 20]

Two brokerless pipelines of the same plan live in one process, one whose workers measure
(``WorkerSettings(metrics=True)``) and serve ``/metrics``, scraped once a second from a
process of its own as Prometheus would, and one that does not (``metrics=False``, no
server). The benchmark drives them in turn, ``--seconds`` each, ``--rounds`` times ("on"
first in every other round), so a swing of the shared machine's load hits both sides
alike; separate-process legs (``bench.bench_pipeline --metrics alternate``) swung by
+-25% between legs even on an idle machine. Reported: the median of the per-round on/off
ratios of throughput and of CPU milliseconds per request (this process: client, broker
and every stage), with their quartiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_pipeline import drive, make_requests, pipeline_batch, run_leg, scraping


async def _sides(plan: Any, batch: int, stack: contextlib.AsyncExitStack) -> dict[str, Any]:
    """The two clients ("on", "off"), each with its in-process workers; the "on" side's
    metrics served and scraped."""
    from conveyor.app.connect import connect
    from conveyor.app.observe import ObserveServer
    from workers.settings import WorkerSettings

    clients: dict[str, Any] = {}
    for side in ("on", "off"):
        settings = WorkerSettings(device="cpu", max_batch=batch, metrics=side == "on")
        clients[side] = await stack.enter_async_context(
            connect(None, plan=plan, timeout=60.0, worker_options={"settings": settings})
        )
    server = ObserveServer(0, host="127.0.0.1")
    server.add_registry(clients["on"].workers.metrics.registry)
    await server.start()
    stack.push_async_callback(server.stop)
    stack.enter_context(scraping([server.bound_port]))
    return clients


async def interleaved(plan: Any, batch: int, seconds: float, rounds: int,
                      warmup: int) -> dict[str, Any]:
    requests = make_requests(plan)
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    async with contextlib.AsyncExitStack() as stack:
        clients = await _sides(plan, batch, stack)
        for side in ("on", "off"):  # warm both before the first measured round
            await drive(clients[side], requests, 0.5, warmup=warmup)
        for i in range(rounds):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for side in order:
                runs[side].append(await drive(clients[side], requests, seconds, warmup=0))
            on, off = runs["on"][-1], runs["off"][-1]
            print(f"  round {i + 1}: on {on['throughput']:,.0f} req/s "
                  f"{_cpu(on):.4f} ms/req, off {off['throughput']:,.0f} req/s "
                  f"{_cpu(off):.4f} ms/req", flush=True)
    return summary(runs)


def _cpu(run: dict[str, Any]) -> float:
    return float(run["cpu_ms_per_request"]["this process"])


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    pairs = list(zip(runs["on"], runs["off"], strict=True))
    throughput = [on["throughput"] / off["throughput"] for on, off in pairs]
    cpu = [_cpu(on) / _cpu(off) for on, off in pairs]

    def spread(values: list[float]) -> dict[str, float]:
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        return {"median": round(float(median), 4), "q1": round(float(q1), 4),
                "q3": round(float(q3), 4)}

    return {
        "rounds": len(pairs),
        "throughput_on_over_off": spread(throughput),
        "cpu_per_request_on_over_off": spread(cpu),
        "throughput_median": {s: round(float(np.median([r["throughput"] for r in rs])))
                              for s, rs in runs.items()},
        "cpu_ms_per_request_median": {s: round(float(np.median([_cpu(r) for r in rs])), 4)
                                      for s, rs in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from bench.bench_pipeline import WORKLOADS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    p.add_argument("--seconds", type=float, default=1.0, help="each side, each round (1)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--cache", type=Path,
                   default=Path(tempfile.gettempdir()) / "conveyor-bench" / "profile")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    from conveyor.plan import Plan

    # TensorFlow builds the models in a process of its own (never in the measured one).
    run_leg(["--leg", "prepare", "--cache", str(args.cache), "--only", args.workload])
    plan = Plan.load(args.cache / args.workload / "plan")
    batch = pipeline_batch(plan, args.max_batch, args.workload)
    warmup = 200 if args.workload == "W1" else 32
    result = asyncio.run(interleaved(plan, batch, args.seconds, args.rounds, warmup))
    t, c = result["throughput_on_over_off"], result["cpu_per_request_on_over_off"]
    print(f"{args.workload} brokerless, metrics on / off over {result['rounds']} rounds: "
          f"throughput {t['median']:.3f} (quartiles {t['q1']:.3f}-{t['q3']:.3f}), "
          f"CPU per request {c['median']:.3f} (quartiles {c['q1']:.3f}-{c['q3']:.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
