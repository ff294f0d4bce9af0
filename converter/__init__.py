"""The converter: export a model to ONNX and split it into stages, writing a plan.

Pure steps (``export.prepare``, ``graph.analyze``, ``split_layer``, ``split_function``,
``extract``) with thin file-facing wrappers (``export.load_model``, ``plan_writer``).
The public entry point is ``convert``; ``verify.run_plan_sequentially`` checks a plan.
Heavy modules are imported on first use so that the CLI stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converter.api import analyze_model, convert
    from converter.verify import run_plan_sequentially

__all__ = ["analyze_model", "convert", "run_plan_sequentially"]


def __getattr__(name: str) -> Any:
    if name in ("convert", "analyze_model"):
        from converter import api

        return getattr(api, name)
    if name == "run_plan_sequentially":
        from converter.verify import run_plan_sequentially

        return run_plan_sequentially
    raise AttributeError(f"module 'converter' has no attribute {name!r}")
