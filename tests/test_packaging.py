"""What ``pip install`` resolves on each platform, and ``conveyor --version``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import conveyor

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = {
    "linux-x86_64": {"platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"platform_system": "Linux", "platform_machine": "aarch64"},
    "macos-arm64": {"platform_system": "Darwin", "platform_machine": "arm64"},
    "macos-x86_64": {"platform_system": "Darwin", "platform_machine": "x86_64"},
}


def _runtime_for(env: dict[str, str]) -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = [Requirement(d) for d in deps]
    return [
        r.name for r in wanted
        if r.name.startswith("onnxruntime") and (r.marker is None or r.marker.evaluate(env))
    ]


@pytest.mark.parametrize(
    ("platform", "expected"),
    [
        ("linux-x86_64", ["onnxruntime-gpu"]),  # the only platform with a CUDA wheel
        ("linux-aarch64", ["onnxruntime"]),
        ("macos-arm64", ["onnxruntime"]),
        ("macos-x86_64", ["onnxruntime"]),
    ],
)
def test_exactly_one_onnxruntime_per_platform(platform: str, expected: list[str]) -> None:
    assert _runtime_for(PLATFORMS[platform]) == expected


def test_version_flag_prints_the_package_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "conveyor", "--version"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 0
    assert done.stdout.strip() == f"conveyor {conveyor.__version__}"
