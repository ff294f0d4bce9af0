"""The onnxruntime session of one stage: provider choice, threads, errors at the boundary.

Device choice (``--device``):

* ``cpu``: the CPU execution provider.
* ``cuda`` / ``cuda:N``: the CUDA provider on device N; if onnxruntime does not offer it,
  or the session silently falls back to CPU (missing CUDA libraries), ``ConfigError``.
* ``auto``: CUDA when onnxruntime offers it *and* a session actually gets it, else CPU.
  onnxruntime-gpu lists CUDA in ``get_available_providers()`` even on machines without
  CUDA and then logs an error while falling back; the probe runs with onnxruntime's
  logging turned down and ``session.get_providers()`` decides. The outcome is logged once
  per device with the reason.

On CUDA, ``run_bound`` runs through IO binding: inputs may be device ``OrtValue``s from a
stage hosted in the same process and outputs stay on the device, so a chain of local
stages never round-trips through the host; ``to_host`` copies at a process boundary. On
CPU both paths are plain numpy. (CI has no GPU: the CUDA path is written to onnxruntime's
documented IO-binding API and was not run here.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from conveyor.errors import ConfigError, InferenceError, PlanError
from conveyor.plan import StageSpec
from workers.settings import parse_device

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

#: A tensor a stage hands on: a host array, or an ``ort.OrtValue`` on the device (CUDA).
Tensor = Any

_probe_lock = threading.Lock()
#: device id -> (CUDA works, reason); filled by the first session created for that device.
_cuda_outcome: dict[int, tuple[bool, str]] = {}


@dataclass(frozen=True)
class DeviceChoice:
    provider: str
    device_id: int
    reason: str

    @property
    def on_cuda(self) -> bool:
        return self.provider == CUDA


@contextmanager
def _quiet_ort() -> Iterator[None]:
    """Keep onnxruntime's fallback errors (libcublasLt missing, ...) out of the user's log."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def _options(threads: int, inter_threads: int, quiet: bool) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = inter_threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        so.log_severity_level = 4
    return so


class StageSession:
    """One stage's ``InferenceSession``; ``run`` raises ``InferenceError`` naming the stage."""

    def __init__(self, stage: StageSpec, session: ort.InferenceSession, choice: DeviceChoice):
        self.stage = stage
        self.choice = choice
        self._session = session
        self._outputs = [o.name for o in session.get_outputs()]
        self._inputs = [i.name for i in session.get_inputs()]

    @property
    def provider(self) -> str:
        return self.choice.provider

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @classmethod
    def load(
        cls,
        path: Path,
        stage: StageSpec,
        *,
        device: str = "auto",
        threads: int = 1,
        inter_threads: int = 1,
    ) -> StageSession:
        """Create the session for ``stage`` from ``path`` on ``device`` (see module doc)."""
        device = parse_device(device)
        if not path.is_file():
            raise PlanError(f"stage {stage.name!r}: cannot read {path}: no such file")
        # The path, not its bytes: onnxruntime finds external data next to the model
        # file, whatever the working directory.
        model = str(path)
        available = ort.get_available_providers()
        if device == "cpu":
            choice = DeviceChoice(CPU, 0, "--device cpu")
            return cls(stage, cls._create(stage, model, choice, threads, inter_threads), choice)
        device_id = int(device.split(":", 1)[1]) if ":" in device else 0
        if CUDA not in available:
            if device.startswith("cuda"):
                raise ConfigError(
                    f"--device {device}: onnxruntime offers no CUDA provider "
                    f"(available: {available})"
                )
            choice = DeviceChoice(CPU, 0, "onnxruntime offers no CUDA provider")
            return cls(stage, cls._create(stage, model, choice, threads, inter_threads), choice)
        with _probe_lock:
            known = _cuda_outcome.get(device_id)
            if known is not None and not known[0]:
                session, choice = None, DeviceChoice(CPU, 0, known[1])
            else:
                wanted = DeviceChoice(CUDA, device_id, "")
                session = cls._create(stage, model, wanted, threads, inter_threads, quiet=True)
                got = session.get_providers()[0]
                if got == CUDA:
                    reason = f"CUDA provider active on device {device_id}"
                    choice = DeviceChoice(CUDA, device_id, reason)
                else:
                    reason = (
                        f"onnxruntime lists CUDA but a session on device {device_id} fell back "
                        f"to {got} (CUDA libraries or device missing)"
                    )
                    session, choice = None, DeviceChoice(CPU, 0, reason)
                if known is None:
                    _cuda_outcome[device_id] = (got == CUDA, choice.reason)
                    log.info("device %s: %s", device, choice.reason)
        if not choice.on_cuda and device.startswith("cuda"):
            raise ConfigError(f"--device {device} requested but unusable: {choice.reason}")
        if session is None:
            session = cls._create(stage, model, choice, threads, inter_threads)
        return cls(stage, session, choice)

    @staticmethod
    def _create(
        stage: StageSpec,
        model: str,
        choice: DeviceChoice,
        threads: int,
        inter_threads: int,
        quiet: bool = False,
    ) -> ort.InferenceSession:
        providers: list[Any] = [CPU]
        if choice.on_cuda:
            providers = [(CUDA, {"device_id": choice.device_id}), CPU]
        try:
            if quiet:
                with _quiet_ort():
                    return ort.InferenceSession(
                        model, _options(threads, inter_threads, True), providers=providers
                    )
            return ort.InferenceSession(
                model, _options(threads, inter_threads, False), providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise PlanError(
                f"stage {stage.name!r}: onnxruntime cannot load the stage model: {exc}"
            ) from exc

    # -- running ------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on host arrays; returns host arrays by output name."""
        try:
            outs = self._session.run(self._outputs, dict(feeds))
        except Exception as exc:  # onnxruntime's errors are untyped (Fail, InvalidArgument...)
            raise InferenceError(
                f"stage {self.stage.name!r}: onnxruntime failed: {exc}", stage=self.stage.name
            ) from exc
        return dict(zip(self._outputs, outs, strict=True))

    def run_bound(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run through IO binding on CUDA (device outputs); plain ``run`` on CPU."""
        if not self.choice.on_cuda:
            return self.run({k: self.to_host(v) for k, v in feeds.items()})
        try:
            binding = self._session.io_binding()
            for name, value in feeds.items():
                if isinstance(value, np.ndarray):
                    binding.bind_cpu_input(name, np.ascontiguousarray(value))
                else:
                    binding.bind_ortvalue_input(name, value)
            for name in self._outputs:
                binding.bind_output(name, "cuda", self.choice.device_id)
            self._session.run_with_iobinding(binding)
            values = binding.get_outputs()
        except Exception as exc:  # onnxruntime's errors are untyped
            raise InferenceError(
                f"stage {self.stage.name!r}: onnxruntime failed: {exc}", stage=self.stage.name
            ) from exc
        return dict(zip(self._outputs, values, strict=True))

    @staticmethod
    def to_host(value: Tensor) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        return np.asarray(value.numpy())
