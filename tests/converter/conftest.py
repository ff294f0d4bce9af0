"""Converter fixtures: real Keras models exported once per session, and split checks.

``exports.get(name)`` builds a model (no downloads: ``weights=None``, seeded), exports it
with ``converter.export.load_model`` and caches the ONNX file for the whole session; every
split test then starts from that file, as ``conveyor convert model.onnx`` would.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conveyor.plan import Plan

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

#: Relative error allowed between the chained stages and the whole model.
TOLERANCE = 1e-5


def build_mlp() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    init = {"bias_initializer": "random_normal"}  # non-zero biases survive the export
    return keras.Sequential(
        [
            keras.Input(shape=(784,), name="pixels"),
            keras.layers.Dense(64, activation="relu", name="fc1", **init),
            keras.layers.Dense(64, activation="relu", name="fc2", **init),
            keras.layers.Dense(10, activation="softmax", name="probs", **init),
        ],
        name="mlp",
    )


def build_branches() -> Any:
    """Two inputs, two parallel branches, a join, and two output heads."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    init = {"bias_initializer": "random_normal"}
    img = keras.Input(shape=(12,), name="image_features")
    meta = keras.Input(shape=(5,), name="metadata")
    left = layers.Dense(32, activation="relu", name="left_1", **init)(img)
    left = layers.Dense(16, activation="relu", name="left_2", **init)(left)
    right = layers.Dense(24, activation="tanh", name="right_1", **init)(meta)
    right = layers.Dense(16, activation="tanh", name="right_2", **init)(right)
    joined = layers.Concatenate(name="join")([left, right])
    trunk = layers.Dense(20, activation="relu", name="trunk", **init)(joined)
    cls = layers.Dense(3, activation="softmax", name="class_probs", **init)(trunk)
    reg = layers.Dense(1, name="score", **init)(trunk)
    return keras.Model([img, meta], [cls, reg], name="branches")


def _application(name: str) -> Callable[[], Any]:
    def build() -> Any:
        import keras

        keras.utils.set_random_seed(2)
        ctor = getattr(keras.applications, name)
        # 128x128 keeps the runs quick on 2 cores; the graph is the one of 224x224
        return ctor(weights=None, input_shape=(128, 128, 3), classes=100)

    return build


from tests.converter import builders  # noqa: E402

BUILDERS: dict[str, Callable[[], Any]] = {
    "se_cnn": builders.se_cnn,
    "transformer": builders.transformer,
    "gray_cnn": builders.gray_cnn,
    "two_towers": builders.two_towers,
    "mlp": build_mlp,
    "branches": build_branches,
    "mobilenetv2": _application("MobileNetV2"),
    "resnet50": _application("ResNet50"),
    "densenet121": _application("DenseNet121"),
}


class Exports:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._keras: dict[str, Any] = {}

    def keras_model(self, name: str) -> Any:
        if name not in self._keras:
            self._keras[name] = BUILDERS[name]()
        return self._keras[name]

    def get(self, name: str) -> Path:
        path = self.root / f"{name}.onnx"
        if not path.exists():
            import onnx

            from converter.export import load_model

            onnx.save(load_model(self.keras_model(name)), str(path))
        return path


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("exports"))


def assert_reproduces(plan_dir: Path, model: Any, *, batch: int = 2, seed: int = 0) -> Plan:
    """Chained stages on random inputs == the whole model (relative error <= TOLERANCE)."""
    from converter.verify import max_relative_error, random_inputs, run_model, run_plan_sequentially

    plan = Plan.load(plan_dir)
    inputs = random_inputs(plan, batch=batch, seed=seed)
    want = run_model(model, inputs)
    got = run_plan_sequentially(plan, inputs)
    err = max_relative_error(got, want)
    assert err <= TOLERANCE, f"{plan_dir.name}: relative error {err:.3g} > {TOLERANCE}"
    for name, value in got.items():
        assert value.shape[0] == batch, f"{name}: batch {value.shape[0]} != {batch}"
    return plan


def assert_batched_cuts(plan: Plan) -> None:
    """Every tensor between stages has the symbolic batch dimension first."""
    for s in plan.stages:
        for i in s.inputs:
            assert i.tensor.shape[:1] == ("batch",), f"{s.name}: {i.tensor}"


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
