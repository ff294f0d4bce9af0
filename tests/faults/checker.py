"""A checker in the style of rabbitmq/jepsen: what became of every request, by its id.

Each request the test sends gets an id of the test's own (its index) and ends as exactly one
of: answered correctly (compared with onnxruntime running the whole, unsplit model), answered
wrong, a typed error (a ``ConveyorError``, by class), lost (no answer: a ``DeadlineExceeded``
for a request the broker had confirmed, or no outcome at all), or an untyped exception. An id
that gets a second outcome counts as duplicated to the caller. ``Report`` is what tests
assert on; ``str(report)`` is the line printed and recorded in bench/RESULTS.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from conveyor.app.demo import relative_error
from conveyor.errors import ConveyorError, DeadlineExceeded

Outputs = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Report:
    requests: int
    correct: int
    wrong: int
    lost: int
    duplicated: int
    untyped: int
    typed: Mapping[str, int] = field(default_factory=dict)
    #: Replies the client dropped as duplicates on the wire (not seen by the caller).
    wire_duplicates: int = 0

    @property
    def typed_errors(self) -> int:
        return sum(self.typed.values())

    def __str__(self) -> str:
        typed = ", ".join(f"{k} {v}" for k, v in sorted(self.typed.items())) or "none"
        return (
            f"{self.requests} requests: {self.correct} correct, {self.wrong} wrong, "
            f"{self.lost} lost, {self.duplicated} duplicated to the caller, "
            f"typed errors: {typed}, untyped {self.untyped}; "
            f"{self.wire_duplicates} duplicate replies dropped by the client"
        )


class Checker:
    """Collects outcomes by request id; ``reference(inputs)`` gives the whole model's answer."""

    def __init__(self, reference: Callable[[Mapping[str, np.ndarray]], Outputs],
                 tolerance: float = 1e-5) -> None:
        self._reference = reference
        self._tolerance = tolerance
        self._requests: dict[int, Mapping[str, np.ndarray]] = {}
        self._outcomes: dict[int, list[str]] = {}
        self.wrong_examples: list[str] = []

    def sent(self, rid: int, inputs: Mapping[str, np.ndarray]) -> None:
        self._requests[rid] = inputs

    def answered(self, rid: int, got: Outputs) -> None:
        want = self._reference(self._requests[rid])
        ok = sorted(got) == sorted(want) and all(
            relative_error(got[k], want[k]) <= self._tolerance for k in want
        )
        if not ok and len(self.wrong_examples) < 5:
            self.wrong_examples.append(f"request {rid}: got {sorted(got)}")
        self._outcomes.setdefault(rid, []).append("correct" if ok else "wrong")

    def failed(self, rid: int, error: BaseException) -> None:
        """A ``DeadlineExceeded`` of a request the broker had confirmed is a loss; one the
        broker never accepted (``confirmed`` False) is a typed error the caller could act on."""
        if isinstance(error, DeadlineExceeded) and error.confirmed is not False:
            kind = "lost"
        elif isinstance(error, ConveyorError):
            kind = f"typed:{type(error).__name__}"
        else:
            kind = "untyped"
        self._outcomes.setdefault(rid, []).append(kind)

    def lost(self) -> list[int]:
        """The ids of the requests lost (their first outcome), for a failure's diagnosis."""
        return [r for r in self._requests if self._outcomes.get(r, ["lost"])[0] == "lost"]

    def report(self, wire_duplicates: int = 0) -> Report:
        firsts: Counter[str] = Counter()
        duplicated = 0
        for rid in self._requests:
            outcomes = self._outcomes.get(rid, ["lost"])
            duplicated += len(outcomes) > 1
            firsts[outcomes[0]] += 1
        typed = {k.split(":", 1)[1]: v for k, v in firsts.items() if k.startswith("typed:")}
        report = Report(
            requests=len(self._requests), correct=firsts["correct"], wrong=firsts["wrong"],
            lost=firsts["lost"], duplicated=duplicated, untyped=firsts["untyped"],
            typed=typed, wire_duplicates=wire_duplicates,
        )
        print(f"checker: {report}")
        return report

