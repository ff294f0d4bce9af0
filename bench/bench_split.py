"""Split speed: DenseNet121 into 8 stages (no export), ResNet50 export + split.

    python -m bench.bench_split

Targets (issue 2): the split of DenseNet121 into 8 stages under 5 s; export plus split of
ResNet50 under 60 s. Baseline, measured in the same run: ``onnx.utils.extract_model``
(ONNX's own Extractor) cutting the same 8 stages out of the same file, given the tensor
names our split chose; it does no analysis and no search, only extraction.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

T = TypeVar("T")


def _timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def _chain(length: int):  # type: ignore[no-untyped-def]
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    ops = ("Relu", "Tanh", "Sigmoid", "Neg")
    nodes = [helper.make_node(ops[i % 4], [f"t{i}"], [f"t{i + 1}"]) for i in range(length)]
    nodes.append(helper.make_node("Add", [f"t{length}", "w"], ["y"]))
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(np.ones(16, np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    import keras
    import onnx
    import onnx.utils

    from converter import convert
    from converter.costs import estimate_costs
    from converter.export import load_model
    from converter.graph import analyze
    from converter.split_layer import split_by_layer

    rows: list[tuple[str, int, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp_name:
        tmp = Path(tmp_name)

        # -- DenseNet121: export once (not timed against the target), then split
        keras.utils.set_random_seed(0)
        dense = keras.applications.DenseNet121(weights=None)
        proto, t_export = _timed(load_model, dense)
        src = tmp / "densenet121.onnx"
        onnx.save(proto, str(src))
        n = len(proto.graph.node)
        rows.append(("DenseNet121", n, "export (tf2onnx), for reference", t_export, ""))

        def analyse_and_cut() -> object:
            a = analyze(load_model(src))
            return split_by_layer(a, estimate_costs(a), 8)

        _, t_cut = _timed(analyse_and_cut)
        rows.append(("DenseNet121", n, "load + analyse + exact DP, K=8", t_cut, "< 5 s"))
        plan, t_split = _timed(convert, src, tmp / "dense-plan", by="layer", stages=8)
        rows.append(("DenseNet121", n, "split into 8 stages, files written", t_split, "< 5 s"))

        def baseline() -> None:
            for s in plan.stages:
                onnx.utils.extract_model(
                    str(src), str(tmp / f"base-{s.name}.onnx"),
                    [i.tensor.name for i in s.inputs], [o.tensor.name for o in s.outputs],
                    check_model=False,
                )

        _, t_base = _timed(baseline)
        rows.append(("DenseNet121", n, "baseline: onnx.utils.extract_model x8", t_base, ""))

        # -- scaling: synthetic chains (Conv-free, so the DP and analysis dominate)
        for length in (2000, 8000):
            chain = _chain(length)
            _, t_chain = _timed(lambda m=chain: split_by_layer(a := analyze(load_model(m)),
                                                               estimate_costs(a), 8))
            rows.append((f"chain-{length}", length, "load + analyse + exact DP, K=8", t_chain,
                         ""))

        # -- ResNet50: export + split from the Keras object
        keras.utils.set_random_seed(0)
        resnet, t_build = _timed(keras.applications.ResNet50, weights=None)
        rplan, t_total = _timed(convert, resnet, tmp / "resnet-plan", by="layer", stages=8)
        rn = sum(s.cost.nodes for s in rplan.stages)
        rows.append(("ResNet50", rn, "export + split into 8 stages", t_total, "< 60 s"))
        rows.append(("ResNet50", rn, "(Keras model build, not counted)", t_build, ""))

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'model':<12} {'nodes':>5}  {'step':<40} {'seconds':>8}  target")
    for model, nodes, step, secs, target in rows:
        print(f"{model:<12} {nodes:>5}  {step:<40} {secs:>8.2f}  {target}")
    print(f"DenseNet121 plan balance {plan.split.balance:.3f}; "
          f"ResNet50 plan balance {rplan.split.balance:.3f}")


if __name__ == "__main__":
    main()
