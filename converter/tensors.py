"""Tensors as a plan declares them, and random samples of them.

``tensor_spec`` turns what the analysis knows of a tensor into the plan's ``TensorSpec``
(the batch dimension written as ``batch``); ``random_array`` / ``random_inputs_for_model``
make inputs for profiling a model and for checking a split against it.
"""

from __future__ import annotations

import numpy as np
import onnx

from converter.graph import TensorInfo, analyze_io
from conveyor.errors import ConversionError
from conveyor.plan import BATCH, TensorSpec


def tensor_spec(name: str, info: TensorInfo) -> TensorSpec:
    dtype = info.numpy_dtype
    if dtype is None:
        raise ConversionError(f"tensor {name!r} has an element type Conveyor cannot carry")
    if info.shape is None:
        shape: tuple[int | str, ...] = (BATCH, "...")
    else:
        shape = tuple(d if isinstance(d, int) else (d or "?") for d in info.shape)
        if info.batched and shape:
            shape = (BATCH, *shape[1:])
    return TensorSpec(name, dtype, shape)


def random_array(spec: TensorSpec, *, batch: int = 2, rng: np.random.Generator) -> np.ndarray:
    shape = tuple(batch if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) else 1)
                  for i, d in enumerate(spec.shape))
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    return rng.integers(0, 4, shape).astype(dtype)


def random_inputs_for_model(model: onnx.ModelProto, *, batch: int = 2,
                            seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: random_array(tensor_spec(name, info), batch=batch, rng=rng)
            for name, info in analyze_io(model)}
