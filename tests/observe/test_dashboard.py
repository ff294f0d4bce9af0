"""compose/: the Grafana dashboard asks only for metrics Conveyor exposes, Prometheus
scrapes the metrics path, and docs/operations.md documents every metric."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from brokerless import Broker
from conveyor.app.observe import QueueCollector
from conveyor.client import Client
from tests.observe.test_controller_metrics import FakeController
from tests.support.plans import chain_plan
from workers.control.controller import LoggedDecision
from workers.control.metrics import controller_registry
from workers.control.policy_common import MoveWorker
from workers.stage_worker import StageWorker

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
METRIC = re.compile(r"\bconveyor_[a-z_]+\b")


def _names(text: str) -> tuple[set[str], set[str]]:
    """(sample names, family names) of an exposition."""
    samples, families = set(), set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        samples.update(s.name for s in family.samples)
    return samples, families


async def _exposed(tmp_path: Path) -> tuple[set[str], set[str]]:
    plan = chain_plan(tmp_path, 2, name="dash")
    broker = Broker()
    worker = StageWorker(plan, broker.connect())
    await worker.start()
    try:
        async with Client(plan, broker.connect()) as client:
            await client.infer({"x": np.ones((1, 4), np.float32)})
        texts = [generate_latest(worker.metrics.registry).decode()]
    finally:
        await worker.stop(grace=0.5)
    controller = FakeController()
    controller.decisions.append(
        LoggedDecision(0.0, MoveWorker("w", ("s0",), ("s1",), False, "backlog"))
    )
    texts.append(generate_latest(controller_registry(controller)).decode())  # type: ignore[arg-type]
    queues = CollectorRegistry(auto_describe=False)
    queues.register(QueueCollector({"q": "s0"}, lambda q: (1, 1)))  # type: ignore[arg-type]
    texts.append(generate_latest(queues).decode())
    samples: set[str] = set()
    families: set[str] = set()
    for text in texts:
        s, f = _names(text)
        samples |= s
        families |= f
    return samples, families


async def test_every_panel_query_names_a_metric_that_exists(tmp_path: Path) -> None:
    samples, _ = await _exposed(tmp_path)
    dashboard = json.loads((COMPOSE / "grafana/dashboards/conveyor.json").read_text())
    asked = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names, target["expr"]
            asked |= names
    assert asked <= samples, f"not exposed: {sorted(asked - samples)}"
    # What the issue asks the dashboard to show.
    for needed in ("conveyor_requests_total", "conveyor_queue_depth",
                   "conveyor_compute_seconds_bucket", "conveyor_batch_size_sum"):
        assert needed in asked


def test_prometheus_scrapes_conveyor_and_grafana_reads_prometheus() -> None:
    config = yaml.safe_load((COMPOSE / "prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["conveyor"].get("metrics_path", "/metrics") == "/metrics"
    source = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/datasources/conveyor.yml").read_text()
    )["datasources"][0]
    dashboard = json.loads((COMPOSE / "grafana/dashboards/conveyor.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"]}
    assert uids == {source["uid"]}
    provider = yaml.safe_load(
        (COMPOSE / "grafana/provisioning/dashboards/conveyor.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file"


async def test_operations_doc_lists_every_metric(tmp_path: Path) -> None:
    _, families = await _exposed(tmp_path)
    doc = (ROOT / "docs/operations.md").read_text()
    documented = set(METRIC.findall(doc))
    exposed = {f + "_total" if f + "_total" in documented else f for f in families}
    missing = {f for f in exposed if f not in documented and f + "_info" not in documented}
    assert not missing, f"undocumented metrics: {sorted(missing)}"
