"""The session wrapper: device choice, threads, errors naming the stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conveyor.errors import ConfigError, InferenceError
from conveyor.plan import Plan
from tests.support.plans import chain_expected, chain_plan, gather_plan
from workers.session import CPU, CUDA, StageSession
from workers.settings import WorkerSettings, parse_device


def _load(plan: Plan, stage: str, device: str) -> StageSession:
    return StageSession.load(plan.stage_path(stage), plan.stage(stage), device=device, threads=1)


def test_cpu_runs_the_stage(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path, k=1)
    session = _load(plan, "s0", "cpu")
    assert session.provider == CPU
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    np.testing.assert_allclose(session.run({"x": x})["y"], chain_expected(x, 1), rtol=1e-6)


def test_auto_reports_the_provider_the_session_really_got(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path, k=1)
    session = _load(plan, "s0", "auto")
    assert session.provider in (CPU, CUDA)
    assert session.choice.reason
    # get_providers() is the truth: what we report is what onnxruntime runs first.
    assert session._session.get_providers()[0] == session.provider


def test_cuda_without_a_usable_device_is_a_config_error(tmp_path: Path) -> None:
    plan = chain_plan(tmp_path, k=1)
    if _load(plan, "s0", "auto").provider == CUDA:
        pytest.skip("this machine has a working CUDA device")
    with pytest.raises(ConfigError, match="cuda"):
        _load(plan, "s0", "cuda:0")


def test_inference_failure_names_the_stage(tmp_path: Path) -> None:
    plan = gather_plan(tmp_path)
    session = _load(plan, "g", "cpu")
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(InferenceError, match="stage 'g'") as info:
        session.run({"x": x, "idx": np.array([[9]], np.int64)})
    assert info.value.stage == "g"
    assert isinstance(info.value.__cause__, Exception)


def test_device_values_are_checked() -> None:
    assert parse_device("CUDA:1") == "cuda:1"
    for bad in ("gpu", "cuda:", "cuda:x", ""):
        with pytest.raises(ConfigError):
            parse_device(bad)


def test_threads_default_to_cores_divided_among_stages() -> None:
    s = WorkerSettings()
    assert s.threads_per_stage(1) >= s.threads_per_stage(2) >= 1
    assert WorkerSettings(intra_op_threads=3).threads_per_stage(8) == 3
    assert ort.get_device() in ("CPU", "GPU")


def test_settings_from_env() -> None:
    s = WorkerSettings.from_env(
        {
            "CONVEYOR_DEVICE": "cpu",
            "CONVEYOR_MAX_BATCH": "32",
            "CONVEYOR_MAX_DELAY_MS": "1.5",
            "CONVEYOR_GRACE": "3",
        }
    )
    assert (s.device, s.max_batch, s.max_delay_ms, s.grace) == ("cpu", 32, 1.5, 3.0)
    assert WorkerSettings.from_env({}).device == "auto"
    with pytest.raises(ConfigError, match="CONVEYOR_THREADS"):
        WorkerSettings.from_env({"CONVEYOR_THREADS": "many"})
    with pytest.raises(ConfigError, match="max_batch"):
        WorkerSettings(max_batch=0)
