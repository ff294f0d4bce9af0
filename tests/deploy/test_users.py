"""``conveyor users`` and ``conveyor topology`` against a real RabbitMQ: each role can do its
job and the client nothing more (issue 12, "Least privilege")."""

from __future__ import annotations

import contextlib
import json
import re
import stat
import urllib.parse
from pathlib import Path

import numpy as np
import pika
import pika.exceptions
import pytest

from conveyor.app.cli import main
from conveyor.app.connect import connect
from conveyor.errors import TransportError
from conveyor.plan import Plan
from conveyor.topology import Topology
from tests.deploy.conftest import Management, chain_plan

pytestmark = pytest.mark.rabbitmq


def _url(base: str, user: str, password: str, vhost: str) -> str:
    parts = urllib.parse.urlsplit(base)
    host = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}"
    return f"amqp://{user}:{password}@{host}/{urllib.parse.quote(vhost, safe='')}"


def test_users_writes_secrets_mode_600_and_prints_no_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = chain_plan(tmp_path / "plan")
    monkeypatch.setenv("CONVEYOR_CLIENT_PASSWORD", "from-the-env.1")
    assert main(["users", str(plan.directory), "--secrets", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    document = json.loads(printed)
    secrets = {p.stem: p.read_text().strip() for p in (tmp_path / "s").glob("*.password")}
    assert set(secrets) == {"admin", "client", "worker", "controller"}
    assert secrets["client"] == "from-the-env.1"
    for path in (tmp_path / "s").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    for password in secrets.values():
        assert password not in printed
    assert {u["name"] for u in document["users"]} == {
        "conveyor-admin", "conveyor-client", "conveyor-worker", "conveyor-controller"}
    # a second run keeps the passwords a running broker already has
    monkeypatch.delenv("CONVEYOR_CLIENT_PASSWORD")
    assert main(["users", str(plan.directory), "--secrets", str(tmp_path / "s")]) == 0
    again = {p.stem: p.read_text().strip() for p in (tmp_path / "s").glob("*.password")}
    assert again == secrets


def test_rabbitmqctl_format_puts_no_password_on_a_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = chain_plan(tmp_path / "plan")
    assert main(["users", str(plan.directory), "--format", "rabbitmqctl",
                 "--secrets", str(tmp_path / "s")]) == 0
    script = capsys.readouterr().out
    assert "import_definitions" in script and "set_permissions" in script
    for path in (tmp_path / "s").glob("*.password"):
        assert path.read_text().strip() not in script
    assert stat.S_IMODE((tmp_path / "s" / "users.json").stat().st_mode) == 0o600


@pytest.fixture
def deployed(
    tmp_path: Path, rabbitmq_url: str, management: Management, vhost: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> tuple[Plan, dict[str, str]]:
    """The chain plan with its users imported into a fresh vhost and its topology declared
    by the admin; role -> URL."""
    plan = chain_plan(tmp_path / "plan")
    prefix = f"t{plan.short_hash[:8]}"
    defs = tmp_path / "defs.json"
    assert main(["users", str(plan.directory), "--vhost", vhost, "--prefix", prefix,
                 "--secrets", str(tmp_path / "s"), "--out", str(defs)]) == 0
    management.call("POST", "/definitions", json.loads(defs.read_text()))
    urls = {
        role: _url(rabbitmq_url, f"{prefix}-{role}",
                   (tmp_path / "s" / f"{role}.password").read_text().strip(), vhost)
        for role in ("admin", "client", "worker", "controller")
    }
    monkeypatch.setenv("CONVEYOR_AMQP_URL", urls["admin"])
    assert main(["topology", str(plan.directory)]) == 0
    assert "declared" in capsys.readouterr().out
    yield plan, urls
    for role in urls:
        management.call("DELETE", f"/users/{prefix}-{role}")


async def test_each_role_does_its_job_and_the_client_nothing_more(
    deployed: tuple[Plan, dict[str, str]],
) -> None:
    from workers.amqp import AmqpTransport
    from workers.control.agent import ControlAgent
    from workers.control.controller import Controller
    from workers.control.policies import PolicyConfig
    from workers.stage_worker import StageWorker

    plan, urls = deployed
    topo = Topology.of(plan)
    wt = await AmqpTransport.connect(urls["worker"])
    ct = await AmqpTransport.connect(urls["controller"])
    try:
        worker = StageWorker(plan, wt, None, declare=False)
        await worker.start()
        agent = ControlAgent(wt, topo, worker, worker.worker_id)
        await agent.start()
        controller = Controller(ct, plan, PolicyConfig.from_plan(plan, "static"), period=0.2)
        async with controller, connect(urls["client"], plan=plan, declare_topology=False,
                           local_workers=False, timeout=20) as client:
            x = np.arange(6, dtype=np.float32).reshape(2, 3)
            out = await client.infer({"x": x})
            np.testing.assert_allclose(out["z"], 9 * x + 4)
            transport = client.transport
            assert transport is not None
            with pytest.raises(TransportError, match="ACCESS_REFUSED"):
                await transport.bind_queue(client.reply_queue, topo.input_exchange, "")
            with pytest.raises(TransportError, match="ACCESS_REFUSED"):
                await transport.delete_queue(topo.stage_queue("b"))
        await agent.stop()
        await worker.stop(1.0)
    finally:
        await wt.close(grace=1.0)
        await ct.close(grace=1.0)


def test_client_cannot_purge_or_declare_in_the_plan(deployed: tuple[Plan, dict[str, str]]) -> None:
    plan, urls = deployed
    topo = Topology.of(plan)
    params = pika.URLParameters(urls["client"])
    for action in (
        lambda ch: ch.queue_purge(topo.stage_queue("b")),
        lambda ch: ch.queue_purge(topo.input_queue(0)),
        lambda ch: ch.queue_declare(topo.base + ".stolen"),
        lambda ch: ch.queue_bind(topo.input_queue(0), topo.input_exchange, "x"),
    ):
        with pika.BlockingConnection(params) as conn:
            channel = conn.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
                action(channel)
            assert caught.value.reply_code == 403


async def test_a_client_that_declares_the_topology_is_refused(
    deployed: tuple[Plan, dict[str, str]],
) -> None:
    plan, urls = deployed
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        async with connect(urls["client"], plan=plan, local_workers=False):
            pass


async def test_the_controller_user_reads_queue_depths_for_keda(
    deployed: tuple[Plan, dict[str, str]],
) -> None:
    """KEDA's RabbitMQ scaler and the controller read depths with a passive declare."""
    from workers.amqp import AmqpTransport

    plan, urls = deployed
    topo = Topology.of(plan)
    transport = await AmqpTransport.connect(urls["controller"])
    try:
        for queue in (topo.input_queue(0), topo.stage_queue("b")):
            assert (await transport.queue_stats(queue)).depth == 0
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            await transport.delete_queue(topo.stage_queue("b"))
    finally:
        await transport.close(grace=0.5)


def test_the_rabbitmqctl_script_creates_working_users(
    tmp_path: Path, rabbitmq_url: str, management: Management, vhost: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import shutil
    import subprocess

    local = urllib.parse.urlsplit(rabbitmq_url).hostname in ("127.0.0.1", "localhost")
    if shutil.which("rabbitmqctl") is None or not local:
        pytest.skip("needs rabbitmqctl for the local broker")
    plan = chain_plan(tmp_path / "plan")
    prefix = f"s{plan.short_hash[:8]}"
    assert main(["users", str(plan.directory), "--format", "rabbitmqctl", "--vhost", vhost,
                 "--prefix", prefix, "--secrets", str(tmp_path / "s")]) == 0
    script = tmp_path / "users.sh"
    script.write_text(capsys.readouterr().out)
    try:
        done = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=180,
                              check=False)
        assert done.returncode == 0, done.stderr
        perms = management.call("GET", f"/users/{prefix}-client/permissions")
        assert [(p["vhost"], p["write"]) for p in perms] == [
            (vhost, f"^({re.escape(Topology.of(plan).input_exchange)})$")]
        client = pika.URLParameters(_url(rabbitmq_url, f"{prefix}-client",
                                         (tmp_path / "s" / "client.password").read_text()
                                         .strip(), vhost))
        with pika.BlockingConnection(client):
            pass  # the password from the file logs in
    finally:
        for role in ("admin", "client", "worker", "controller"):
            with contextlib.suppress(OSError):
                management.call("DELETE", f"/users/{prefix}-{role}")


async def test_the_gateway_serves_as_the_client_user_without_declaring(
    deployed: tuple[Plan, dict[str, str]],
) -> None:
    """The stacks run ``conveyor gateway --no-declare`` with the client user's URL."""
    import aiohttp

    from conveyor.app.gateway import GatewaySettings, serve_gateway
    from conveyor.app.transports import BrokerTarget

    plan, urls = deployed
    settings = GatewaySettings(port=0)
    gateway = serve_gateway(plan, BrokerTarget(urls["client"]), settings,
                            declare_topology=False)
    async with gateway as running, aiohttp.ClientSession() as http, \
            http.get(f"{running.url}/v2/health/ready") as resp:
        assert resp.status == 200
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        async with serve_gateway(plan, BrokerTarget(urls["client"]), settings):
            pass
