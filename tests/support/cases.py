"""Real models converted into plans: a ``Case`` is a plan (the split model), the unsplit
ONNX model (the reference answers) and a request generator. Unlike tests/support/plans.py
(hand-built ONNX stages), these go through the converter, hence Keras and onnx exports."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conveyor.app.demo import Reference, relative_error
from conveyor.plan import Plan

#: Relative error allowed between a served answer and the whole model's output.
TOLERANCE = 1e-5

Request = dict[str, np.ndarray]


@dataclass
class Case:
    name: str
    plan: Plan
    whole: Path
    make_request: Callable[[np.random.Generator], Request]
    _reference: Reference | None = field(default=None, repr=False)

    def requests(self, n: int, seed: int = 0) -> list[Request]:
        rng = np.random.default_rng(seed)
        return [self.make_request(rng) for _ in range(n)]

    def reference(self, request: Request) -> dict[str, np.ndarray]:
        if self._reference is None:
            self._reference = Reference(self.whole, threads=1)
        return self._reference.run(request)

    def check(self, request: Request, got: dict[str, np.ndarray]) -> float:
        """The worst relative error of ``got`` against the whole model; fails past tolerance."""
        want = self.reference(request)
        assert sorted(got) == sorted(want), f"{self.name}: outputs {sorted(got)} != {sorted(want)}"
        worst = max(relative_error(got[k], want[k]) for k in want)
        assert worst <= TOLERANCE, f"{self.name}: relative error {worst:.3g} > {TOLERANCE}"
        return worst


def convert_case(
    model: Any,
    root: Path,
    name: str,
    *,
    by: str,
    stages: int | None = None,
    make_request: Callable[[np.random.Generator], Request],
) -> Case:
    """Export ``model`` to one ONNX file (the reference) and split that file into a plan
    (``stages=None``: as many as ``conveyor convert`` picks by default)."""
    import onnx

    from converter import convert
    from converter.export import load_model

    whole = root / f"{name}.onnx"
    onnx.save(load_model(model), str(whole))
    plan = convert(whole, root / f"{name}-plan", by=by, stages=stages)
    return Case(name, plan, whole, make_request)


def rename_single_input(case: Case) -> Case:
    """Keras names the input of applications models itself; use whatever the plan says."""
    name = case.plan.inputs[0].name
    make = case.make_request

    def request(rng: np.random.Generator) -> Request:
        return {name: next(iter(make(rng).values()))}

    return dataclasses.replace(case, make_request=request)
