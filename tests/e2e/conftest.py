"""End-to-end fixtures: real Keras models, converted once per session (``Case``s, from
tests/support/cases.py), served two ways by the ``pipeline`` fixture
(tests/support/pipeline.py): on brokerless (workers in this process) or on RabbitMQ (one
``python -m conveyor worker`` subprocess per stage), with a connected client.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conveyor.app.demo import build_mlp
from tests.support.cases import Case, Request, convert_case, rename_single_input


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e-models")


@pytest.fixture(scope="session")
def mlp(model_root: Path) -> Case:
    def request(rng: np.random.Generator) -> Request:
        return {"pixels": rng.random((1, 784), dtype=np.float32)}

    return convert_case(build_mlp(0), model_root, "mlp", by="layer", stages=3,
                        make_request=request)


@pytest.fixture(scope="session")
def mobilenet(model_root: Path) -> Case:
    import keras

    keras.utils.set_random_seed(1)
    # 96x96 keeps the suite fast on 2 cores; the graph is the same as at 224x224.
    model = keras.applications.MobileNetV2(input_shape=(96, 96, 3), weights=None, classes=10)

    def request(rng: np.random.Generator) -> Request:
        return {"input_layer": rng.random((1, 96, 96, 3), dtype=np.float32)}

    case = convert_case(model, model_root, "mobilenet", by="layer", stages=2,
                        make_request=request)
    return rename_single_input(case)


@pytest.fixture(scope="session")
def branches(model_root: Path) -> Case:
    """A functional model with two parallel branches joined at the end (fan-out + join)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(2)
    x = keras.Input(shape=(32,), name="features")
    left = layers.Dense(48, activation="relu", name="left_dense1")(x)
    left = layers.Dense(16, activation="relu", name="left_dense2")(left)
    right = layers.Dense(40, activation="tanh", name="right_dense1")(x)
    right = layers.Dense(16, activation="tanh", name="right_dense2")(right)
    joined = layers.Concatenate(name="join_concat")([left, right])
    out = layers.Dense(8, activation="softmax", name="join_out")(joined)
    model = keras.Model(x, out, name="branches")

    def request(rng: np.random.Generator) -> Request:
        return {"features": rng.standard_normal((1, 32)).astype(np.float32)}

    return convert_case(model, model_root, "branches", by="function", stages=3,
                        make_request=request)
