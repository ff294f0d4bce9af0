"""``conveyor demo`` shows the product: the cut, the controller, the per-stage figures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conveyor.app.cli import main
from conveyor.plan import Plan


def check_report(out: str, requests: int) -> None:
    assert f"{requests}/{requests} match the whole model" in out
    assert "balance" in out and re.search(r"stage0\s+input\s+\d+", out)  # the stage table
    stage_lines = re.findall(r"^stage (stage\d) +([\d,]+) requests in", out, re.M)
    assert [s for s, _ in stage_lines] == ["stage0", "stage1", "stage2"]
    # warm-up requests come on top of the measured ones
    assert all(int(n.replace(",", "")) >= requests for _, n in stage_lines)
    m = re.search(r"controller: policy hybrid.*?(\d+) heartbeats from (\d+) worker", out)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1


def test_demo_in_process_keeps_the_plan_with_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONVEYOR_AMQP_URL", raising=False)
    assert main(["demo", "--requests", "300", "--concurrency", "8", "--no-progress",
                 "--out", str(tmp_path / "kept")]) == 0
    check_report(capsys.readouterr().out, 300)
    plan = Plan.load(tmp_path / "kept" / "layer-3")  # hash verified: the files are all there
    assert len(plan.stages) == 3


@pytest.mark.rabbitmq
def test_demo_on_rabbitmq_runs_one_worker_process_per_stage(
    rabbitmq_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONVEYOR_AMQP_URL", rabbitmq_url)
    assert main(["demo", "--requests", "300", "--concurrency", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    check_report(out, 300)
    assert re.search(r"started 3 worker process\(es\) on RabbitMQ", out)
    assert "guest:guest" not in out  # the URL's credentials are never shown
