"""``conveyor deploy compose``: the generated project validates with ``docker-compose config``
on what it wrote alone, has every stage and shard, and the checked-in ``compose/`` is what
the generator writes for the demo plan."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conveyor.app.cli import build_parser
from conveyor.app.deploy.compose import write_compose
from conveyor.plan import Plan
from tests.deploy.conftest import join_plan
from tests.support.synthetic import synthetic_plan

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
#: The generated files that are checked in (the others hold secrets or random salts).
CHECKED_IN = ("docker-compose.yml", "enabled_plugins", "rabbitmq/rabbitmq.conf",
              "prometheus/prometheus.yml", "grafana/provisioning/datasources/conveyor.yml",
              "grafana/provisioning/dashboards/conveyor.yml")


def demo_plan(root: Path) -> Plan:
    """The shape of `conveyor demo`'s plan (a 3-stage layer split, default schedule) at
    ``root/plans/demo``: all the compose project depends on."""
    plan = synthetic_plan(["stage0", "stage1", "stage2"], name="mlp")
    return dataclasses.replace(plan, directory=root / "plans" / "demo")


def _load(out: Path) -> dict[str, Any]:
    data = yaml.safe_load((out / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _compose_config(out: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        message = "docker-compose (v1) client not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_")}
    return subprocess.run(["docker-compose", "-f", str(out / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, timeout=60, check=False, cwd=cwd,
                          env=env)


def test_checked_in_compose_is_the_generators_output_for_the_demo_plan(tmp_path: Path) -> None:
    out = tmp_path / "compose"
    write_compose(demo_plan(tmp_path), out)
    for name in CHECKED_IN:
        assert (COMPOSE / name).read_text() == (out / name).read_text(), (
            f"compose/{name} is stale: regenerate with "
            "`conveyor deploy compose plans/demo --out compose`")


def test_docker_compose_config_passes_on_what_it_wrote_alone(tmp_path: Path) -> None:
    out = tmp_path / "project"
    plan = dataclasses.replace(join_plan(), directory=tmp_path / "plan")
    write_compose(plan, out)
    assert stat.S_IMODE((out / ".env").stat().st_mode) == 0o600
    for secret in (out / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    result = _compose_config(out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    passwords = dict(line.split("=", 1) for line in (out / ".env").read_text().splitlines())
    url = resolved["services"]["stage-head"]["environment"]["CONVEYOR_AMQP_URL"]
    assert url == (f"amqp://conveyor-worker:{passwords['CONVEYOR_WORKER_PASSWORD']}"
                   "@rabbitmq:5672/%2F")
    # without its .env compose refuses to start: never an empty password
    (out / ".env").unlink()
    refused = _compose_config(out, cwd=tmp_path)
    assert refused.returncode != 0
    assert "CONVEYOR_" in refused.stderr and "PASSWORD" in refused.stderr


def test_a_four_stage_plan_with_a_join_has_every_stage_and_shard(tmp_path: Path) -> None:
    plan = dataclasses.replace(join_plan(workers=2), directory=tmp_path / "plan")
    write_compose(plan, tmp_path / "out")
    services = _load(tmp_path / "out")["services"]
    workers = {n: s for n, s in services.items() if s.get("command", [])[:2] == ["conveyor",
                                                                                  "worker"]}
    assert set(workers) == {"stage-head", "stage-left", "stage-right", "stage-join-shard-0",
                            "stage-join-shard-1"}
    assert workers["stage-left"]["deploy"]["replicas"] == 3  # the plan's static schedule
    assert workers["stage-head"]["deploy"]["replicas"] == 1
    for i in (0, 1):
        command = workers[f"stage-join-shard-{i}"]["command"]
        assert command[command.index("--shard") + 1] == str(i)
        assert workers[f"stage-join-shard-{i}"]["deploy"]["replicas"] == 1
    assert {"rabbitmq", "topology", "controller", "prometheus", "grafana"} <= set(services)
    scraped = yaml.safe_load((tmp_path / "out" / "prometheus" / "prometheus.yml").read_text())
    names = scraped["scrape_configs"][0]["dns_sd_configs"][0]["names"]
    assert set(workers) | {"controller"} == set(names)


def test_every_command_is_one_the_cli_accepts(tmp_path: Path) -> None:
    plan = dataclasses.replace(join_plan(), directory=tmp_path / "plan")
    write_compose(plan, tmp_path / "out")
    parser = build_parser()
    known = parser.parse_known_args
    for name, service in _load(tmp_path / "out")["services"].items():
        command = service.get("command")
        if not command or command[0] != "conveyor":
            continue
        args = list(command[1:])
        if "--metrics-port" in args:
            # issue 13 adds --metrics-port; until it lands the flag is the one unknown
            _, unknown = known(args)
            assert unknown in ([], ["--metrics-port", "9100"]), (name, unknown)
            continue
        parser.parse_args(args)


def test_no_credentials_and_no_broker_url_on_a_command_line(tmp_path: Path) -> None:
    plan = dataclasses.replace(join_plan(), directory=tmp_path / "plan")
    write_compose(plan, tmp_path / "out")
    text = (tmp_path / "out" / "docker-compose.yml").read_text()
    for password in (tmp_path / "out" / "secrets").iterdir():
        assert password.read_text().strip() not in text
    for match in re.finditer(r"amqp://([^\s\"']+)@", text):
        assert "${" in match.group(1), f"literal credentials in {match.group(0)!r}"
    assert "guest" not in text
    for service in _load(tmp_path / "out")["services"].values():
        assert "--broker" not in service.get("command", [])
        if service.get("command", [""])[0] == "conveyor":
            assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
            assert "CONVEYOR_AMQP_URL" in service["environment"]


def test_rabbitmq_gets_the_plugins_and_the_users(tmp_path: Path) -> None:
    plan = dataclasses.replace(join_plan(), directory=tmp_path / "plan")
    write_compose(plan, tmp_path / "out")
    rabbit = _load(tmp_path / "out")["services"]["rabbitmq"]
    mounts = {v.split(":")[0]: v.split(":")[1] for v in rabbit["volumes"]}
    assert mounts["./enabled_plugins"] == "/etc/rabbitmq/enabled_plugins"
    plugins = (tmp_path / "out" / "enabled_plugins").read_text()
    for plugin in ("rabbitmq_consistent_hash_exchange", "rabbitmq_random_exchange"):
        assert plugin in plugins
    conf = (tmp_path / "out" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert mounts["./rabbitmq/definitions.json"] in conf
    assert "healthcheck" in rabbit
    topology = _load(tmp_path / "out")["services"]["topology"]["command"]
    assert topology[topology.index("--queue-type") + 1] == "quorum"


def test_gpu_reserves_devices_for_the_chosen_stages(tmp_path: Path) -> None:
    plan = dataclasses.replace(join_plan(), directory=tmp_path / "plan")
    write_compose(plan, tmp_path / "all", gpu=True)
    write_compose(plan, tmp_path / "one", gpu_stages=("left",))
    write_compose(plan, tmp_path / "none")

    def gpu_services(out: Path) -> set[str]:
        return {n for n, s in _load(out)["services"].items()
                if s.get("deploy", {}).get("resources", {}).get("reservations", {})
                .get("devices", [{}])[0].get("capabilities") == ["gpu"]}

    assert gpu_services(tmp_path / "all") == {
        "stage-head", "stage-left", "stage-right", "stage-join-shard-0", "stage-join-shard-1"}
    assert gpu_services(tmp_path / "one") == {"stage-left"}
    assert gpu_services(tmp_path / "none") == set()
    left = _load(tmp_path / "one")["services"]["stage-left"]
    assert left["image"] == "conveyor:cuda" and "cuda" in left["command"]


def test_the_gateway_joins_the_stack_once_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conveyor.app.deploy import stack

    plan = dataclasses.replace(join_plan(), directory=tmp_path / "plan")
    monkeypatch.setattr(stack, "has_gateway", lambda: True)
    write_compose(plan, tmp_path / "out")
    gateway = _load(tmp_path / "out")["services"]["gateway"]
    assert gateway["command"][:2] == ["conveyor", "gateway"]
    assert gateway["environment"]["CONVEYOR_AMQP_URL"].startswith("amqp://conveyor-client:")
    assert gateway["ports"] == ["127.0.0.1:8000:8000"]
