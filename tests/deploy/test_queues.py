"""The plan's ``queues`` setting: absent from old plans (their hash unchanged), quorum
queues declared by ``conveyor topology`` where the plan or the command asks."""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from conveyor.app.cli import main
from conveyor.errors import PlanError
from conveyor.plan import PLAN_FILE, Plan, QueueSettings
from conveyor.topology import Topology
from tests.deploy.conftest import Management, chain_plan


def test_a_plan_without_the_setting_keeps_its_json_and_hash(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path / "plan")
    body = json.loads((tmp_path / "plan" / PLAN_FILE).read_text())
    assert "queues" not in body
    assert Plan.load(tmp_path / "plan").hash == plan.hash


def test_quorum_round_trips_and_bad_values_are_refused(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path / "plan")
    quorum = plan.with_settings(queues=QueueSettings("quorum", delivery_limit=2))
    saved = quorum.save(tmp_path / "plan")
    assert saved.hash != plan.hash
    assert Plan.load(tmp_path / "plan").queues == QueueSettings("quorum", 2)
    body = json.loads((tmp_path / "plan" / PLAN_FILE).read_text())
    for bad in ({"type": "stream"}, {"type": "quorum", "delivery_limit": -1}):
        with pytest.raises(PlanError, match="queues"):
            Plan.from_dict({**body, "queues": bad})


@pytest.mark.rabbitmq
def test_topology_declares_quorum_queues(
    tmp_path: Path, rabbitmq_url: str, management: Management, vhost: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plan = chain_plan(tmp_path / "plan")
    plan = plan.with_settings(queues=QueueSettings(delivery_limit=3))
    plan = plan.save(tmp_path / "plan")
    parts = urllib.parse.urlsplit(rabbitmq_url)
    url = parts._replace(path="/" + urllib.parse.quote(vhost, safe="")).geturl()
    monkeypatch.setenv("CONVEYOR_AMQP_URL", url)
    assert main(["topology", str(plan.directory), "--queue-type", "quorum"]) == 0
    queues = {q["name"]: q for q in management.call("GET", f"/queues/{management.quote(vhost)}")}
    topo = Topology.of(plan)
    for name in (topo.input_queue(0), topo.stage_queue("b")):
        assert queues[name]["type"] == "quorum"
        assert queues[name]["durable"] is True
        assert queues[name]["arguments"]["x-delivery-limit"] == 3
    # declaring again is idempotent (the same arguments)
    assert main(["topology", str(plan.directory), "--queue-type", "quorum"]) == 0


def test_a_plan_with_per_stage_schedules_saves_and_loads(tmp_path: Path) -> None:
    # the generated stacks take replicas from here; saving such a plan used to fail in
    # json.dumps (the schedules stayed dataclasses)
    from conveyor.plan import Scheduling, StageSchedule

    plan = chain_plan(tmp_path / "plan")
    sched = Scheduling(stages={"b": StageSchedule(workers=3, prefetch=8)})
    plan.with_settings(scheduling=sched).save(tmp_path / "plan")
    assert Plan.load(tmp_path / "plan").scheduling.for_stage("b") == StageSchedule(3, 8)
