"""The OIP gateway against the SDK: W1 and W2, brokerless and RabbitMQ, concurrency sweep.

    python -m bench.bench_gateway [--seconds 3] [--cache DIR] [--no-rabbitmq] [--only W2]

Every leg is ``conveyor bench`` (its --json): through the SDK (``conveyor bench PLAN``), and
through HTTP to a ``conveyor gateway`` process (``conveyor bench PLAN --gateway URL``). On
brokerless the SDK leg hosts the stages in the measuring process and the HTTP leg in the
gateway's; on RabbitMQ one ``conveyor worker`` per stage serves both legs. perf_analyzer
is not used: PyPI's ``perf-analyzer`` here is a 2 kB placeholder (0.1.0, no binary), and
the binary ships only in Triton's SDK container. The plans come from bench.bench_pipeline's
cache (``python -m bench.bench_pipeline --prepare-only`` or a previous run).

Target (issue 14): HTTP keeps >= 80% of the SDK's W2 throughput at concurrency 16 brokerless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.bench_pipeline import REPO, cpu_seconds, isolated_copy

LEVELS = ["1,4,16,64"]  # a list, so that --levels can replace it
#: W2 is compute-bound: batches of 8 let the two stages work at once (bench_pipeline).
MAX_BATCH = {"W1": None, "W2": 8}
AMQP = os.environ.get("CONVEYOR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def conveyor(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
    return subprocess.Popen([sys.executable, "-m", "conveyor", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, **kw)


def bench_leg(plan: Path, seconds: float, extra: list[str], env: dict[str, str]) -> Any:
    proc = conveyor("bench", str(plan), "--concurrency", LEVELS[0], "--seconds", str(seconds),
                    "--warmup", "0.5", "--json", "--no-progress", *extra, env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"bench {extra} failed:\n{err[-3000:]}")
    return json.loads(out)["points"]


def wait_ready(url: str, proc: subprocess.Popen[Any], limit: float = 60.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("gateway not ready in time")


def answered(url: str) -> float:
    """Infer requests the gateway has answered (its /metrics)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        return sum(float(line.rsplit(" ", 1)[1]) for line in r.read().decode().splitlines()
                   if line.startswith("conveyor_gateway_requests_total"))


def with_gateway(plan: Path, seconds: float, gw_args: list[str], env: dict[str, str]) -> Any:
    """The HTTP leg; adds the gateway process's CPU ms per request (warm-ups included)."""
    port = "8765"
    gw = conveyor("gateway", str(plan), "--port", port, *gw_args, env=env,
                  stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, gw)
        cpu0, n0 = cpu_seconds(gw.pid), answered(url)
        points = bench_leg(plan, seconds, ["--gateway", url], env)
        cpu, n = cpu_seconds(gw.pid) - cpu0, answered(url) - n0
        for p in points:
            p["gateway_cpu_ms_per_request"] = round(cpu * 1e3 / n, 3) if n else 0.0
        return points
    finally:
        gw.terminate()
        gw.wait(30)


def brokerless(plan: Path, name: str, seconds: float) -> dict[str, Any]:
    opts = ["--embedded", "--device", "cpu"]
    if MAX_BATCH[name]:
        opts += ["--max-batch", str(MAX_BATCH[name])]
    return {"sdk": bench_leg(plan, seconds, opts, {}),
            "http": with_gateway(plan, seconds, opts, {})}


def rabbitmq(plan_dir: Path, name: str, seconds: float) -> dict[str, Any]:
    from conveyor.plan import Plan

    env = {"CONVEYOR_AMQP_URL": AMQP}  # never on a command line
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        plan = isolated_copy(Plan.load(plan_dir), Path(tmp) / "plan")
        threads = str(max(1, (os.cpu_count() or 1) // len(plan.stages)))
        batch = ["--max-batch", str(MAX_BATCH[name])] if MAX_BATCH[name] else []
        workers = [conveyor("worker", str(plan.directory), "--stage", s, "--device", "cpu",
                            "--threads", threads, *batch, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True) for s in plan.stage_names]
        try:
            for w in workers:
                assert w.stdout is not None
                for line in w.stdout:
                    if line.strip() == "conveyor: ready":
                        break
            return {"sdk": bench_leg(plan.directory, seconds, [], env),
                    "http": with_gateway(plan.directory, seconds, [], env)}
        finally:
            for w in workers:
                w.terminate()
            for w in workers:
                w.wait(30)


def table(results: dict[str, Any]) -> str:
    lines = ["| workload | transport | c | SDK req/s | SDK p50 / p99 ms | HTTP req/s | "
             "HTTP p50 / p99 ms | HTTP / SDK | CPU ms/req SDK | CPU ms/req HTTP (client + "
             "gateway) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key, legs in results.items():
        w, transport = key.split("/")
        for s, h in zip(legs["sdk"], legs["http"], strict=True):
            ratio = h["throughput"] / s["throughput"] if s["throughput"] else 0.0
            lines.append(f"| {w} | {transport} | {s['level']:g} | {s['throughput']:,.0f} | "
                         f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} | {h['throughput']:,.0f} | "
                         f"{h['p50_ms']:.1f} / {h['p99_ms']:.1f} | {ratio:.0%} | "
                         f"{s['cpu_ms_per_request']:.2f} | {h['cpu_ms_per_request']:.2f} + "
                         f"{h['gateway_cpu_ms_per_request']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--cache", type=Path,
                   default=Path(tempfile.gettempdir()) / "conveyor-bench" / "profile")
    p.add_argument("--only", choices=["W1", "W2"], action="append")
    p.add_argument("--no-rabbitmq", action="store_true")
    p.add_argument("--levels", default=LEVELS[0], help="concurrency levels (1,4,16,64)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every leg pair (SDK then HTTP) this many times (1)")
    args = p.parse_args(argv)
    LEVELS[0] = args.levels
    results: dict[str, Any] = {}
    for name in args.only or ["W1", "W2"]:
        plan = args.cache / name / "plan"
        if not (plan / "plan.json").exists():
            raise SystemExit(f"no plan at {plan}: run python -m bench.bench_pipeline first")
        for r in range(args.rounds):
            tag = f" r{r + 1}" if args.rounds > 1 else ""
            results[f"{name}/brokerless{tag}"] = brokerless(plan, name, args.seconds)
            if not args.no_rabbitmq:
                results[f"{name}/rabbitmq{tag}"] = rabbitmq(plan, name, args.seconds)
    print(table(results))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
