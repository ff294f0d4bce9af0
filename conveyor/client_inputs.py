"""The client's checks of a request before anything is sent: the plan's input names,
dtypes and fixed dimensions (a few comparisons in the common case, the full explanation
only when something is off), and the plan's per-request size limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn

import numpy as np

from conveyor.errors import CodecError, RequestTooLarge
from conveyor.plan import Plan
from conveyor.wire import check_tensor


class InputCheck:
    """Checks requests for ``plan``."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.limits = plan.limits
        self._checks = [
            (t.name, np.dtype(t.dtype), len(t.shape),
             [(axis, d) for axis, d in enumerate(t.shape) if isinstance(d, int) and d >= 0])
            for t in plan.inputs
        ]

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``inputs`` as the plan takes them; ``CodecError`` naming what is wrong."""
        if len(inputs) != len(self._checks):
            self._explain(inputs)
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, rank, fixed in self._checks:
            array = inputs.get(name)
            if (
                not isinstance(array, np.ndarray)
                or array.dtype != dtype
                or array.ndim != rank
                or any(array.shape[axis] != size for axis, size in fixed)
            ):
                self._explain(inputs)
            arrays[name] = array
        limits = self.limits
        if limits.max_request_rows is not None or limits.max_request_bytes is not None:
            self._check_size(arrays)
        return arrays

    def _check_size(self, arrays: Mapping[str, np.ndarray]) -> None:
        """``RequestTooLarge`` for more rows or bytes than the plan's limits allow (the
        workers refuse such a request too; this saves sending it)."""
        limits = self.limits
        rows = max((a.shape[0] for a in arrays.values() if a.ndim), default=1)
        if limits.max_request_rows is not None and rows > limits.max_request_rows:
            raise RequestTooLarge(
                f"request has {rows} rows; plan {self.plan.name!r} allows at most "
                f"{limits.max_request_rows} per request (limits.max_request_rows): split it "
                "into smaller requests"
            )
        size = sum(a.nbytes for a in arrays.values())
        if limits.max_request_bytes is not None and size > limits.max_request_bytes:
            raise RequestTooLarge(
                f"request carries {size} bytes of tensors; plan {self.plan.name!r} allows at "
                f"most {limits.max_request_bytes} (limits.max_request_bytes): split it into "
                "smaller requests"
            )

    def _explain(self, inputs: Mapping[str, np.ndarray]) -> NoReturn:
        """Raise the CodecError naming what is wrong with ``inputs`` (the slow path)."""
        expected = {t.name: t for t in self.plan.inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise CodecError(
                f"unknown input tensor(s) {unknown}; plan {self.plan.name!r} takes "
                f"{sorted(expected)}"
            )
        for name, spec in expected.items():
            if name not in inputs:
                raise CodecError(f"input tensor {name!r} is missing")
            array = inputs[name]
            if not isinstance(array, np.ndarray):
                raise CodecError(
                    f"input tensor {name!r} must be a numpy array, got {type(array).__name__}"
                )
            check_tensor(name, array, spec)
        raise CodecError(f"inputs do not match plan {self.plan.name!r}: {sorted(inputs)}")
