"""``conveyor inspect PLAN --rate R``: replicas per stage from the plan's FLOPs."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.report import replica_table
from conveyor.app.cli import main
from conveyor.errors import ConfigError
from tests.deploy.conftest import chain_plan


def _replicas(text: str) -> dict[str, int]:
    rows = text.splitlines()[3:]
    return {r.split()[0]: int(r.split()[-2]) for r in rows}


def test_replicas_grow_with_the_rate_and_the_stage_cost(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path / "plan")  # b costs twice a (6 and 12 MFLOPs per sample)
    low = _replicas(replica_table(plan, 1000, replica_flops=1e10))
    high = _replicas(replica_table(plan, 100_000, replica_flops=1e10))
    assert low == {"a": 1, "b": 2}  # 6e9 / 1e10 -> 1, 1.2e10 / 1e10 -> 2
    assert high == {"a": 60, "b": 120}
    with pytest.raises(ConfigError):
        replica_table(plan, 0)


def test_inspect_prints_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = chain_plan(tmp_path / "plan")
    assert main(["inspect", str(plan.directory), "--rate", "5000",
                 "--replica-flops", "1e10"]) == 0
    out = capsys.readouterr().out
    assert "replicas for 5000 samples/s" in out
    assert _replicas(out[out.index("replicas for"):]) == {"a": 3, "b": 6}
