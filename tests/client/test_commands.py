"""``conveyor infer`` and ``conveyor demo`` from the command line (in-process, brokerless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conveyor.app.cli import main
from conveyor.plan import Plan


@pytest.fixture(autouse=True)
def _in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """These commands run in-process: a CONVEYOR_AMQP_URL in the environment would send
    them to RabbitMQ (tests/client/test_broker_target.py covers that)."""
    monkeypatch.delenv("CONVEYOR_AMQP_URL", raising=False)


def test_infer_npy_prints_outputs_and_saves_them(
    scale_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.array([[1, 2, 3], [0, -1, 5]], np.float32)
    np.save(tmp_path / "x.npy", x)
    code = main(["infer", str(scale_plan.directory), str(tmp_path / "x.npy"),
                 "--out", str(tmp_path / "y.npz")])
    out = capsys.readouterr().out
    assert code == 0
    assert "y: shape [2, 3] float32" in out
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], 3 * x + 1)


def test_infer_npz_with_named_inputs(
    scale_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "req.npz", x=np.ones((1, 3), np.float32))
    assert main(["infer", str(scale_plan.directory), str(tmp_path / "req.npz")]) == 0
    assert "max 4 mean 4" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: np.save(p / "in.npy", np.ones((1, 4), np.float32)), "dimension 1 is 4"),
        (lambda p: np.savez(p / "in.npz", z=np.ones((1, 3), np.float32)), "unknown input"),
        (lambda p: (p / "in.npy").write_bytes(b"not numpy"), "cannot read"),
        (lambda p: None, "does not exist"),
    ],
)
def test_infer_bad_input_exits_2_naming_the_cause(
    scale_plan: Plan, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    make: object, message: str,
) -> None:
    assert callable(make)
    make(tmp_path)
    path = tmp_path / ("in.npz" if (tmp_path / "in.npz").exists() else "in.npy")
    assert main(["infer", str(scale_plan.directory), str(path)]) == 2
    assert message in capsys.readouterr().err


def test_demo_serves_checks_and_reports(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--requests", "64", "--concurrency", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "64/64 match the whole model" in out
    assert "requests/s" in out and "p99" in out
    assert "provider:   CPUExecutionProvider" in out
