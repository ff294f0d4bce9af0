"""A ``conveyor worker`` that dies (``os._exit``) when a batch holds a marker value: a
stand-in for a request that kills its worker (an out-of-memory kill, a segfault).

    python -m tests.support.crashing_worker MARKER worker PLAN_DIR --broker URL ...

Test-only: the product has no such hook; this module patches the session's run before
handing the rest of the command line to the CLI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from conveyor.app.cli import main
from workers.session import StageSession

#: Exit status of a death caused by the marker (tests count them).
DIED = 17


def _patch(marker: float) -> None:
    real = StageSession.run_bound

    def run_bound(session: StageSession, feeds: Mapping[str, Any]) -> Any:
        if any(np.any(np.asarray(v) == marker) for v in feeds.values()):
            os._exit(DIED)
        return real(session, feeds)

    StageSession.run_bound = run_bound  # type: ignore[method-assign]


if __name__ == "__main__":
    _patch(float(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
