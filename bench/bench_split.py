"""Split speed (DenseNet121, ResNet50) and split balance (the models of issue 11).

    python -m bench.bench_split            # speed: the targets of issue 2
    python -m bench.bench_split balance    # balance: cut positions, estimated / measured

Balance (issue 11): per model, the allowed cut positions, and at K = 2, 4, 8 the balance
(slowest stage over total / K) of the ``--profile`` split as the FLOP estimate sees it, as
the profile sees it, and as timed: every stage file run on its own with onnxruntime
(default optimisations, one thread, batch 1, median of ``RUNS``), the way a worker runs it.

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


RUNS = 30


def _timed_stages(plan_dir: Path) -> list[float]:
    """Median seconds per stage at batch 1, each stage fed what the previous ones made."""
    import statistics

    import onnxruntime as ort

    from converter.verify import random_inputs, stage_order
    from conveyor.plan import MODEL_INPUT, Plan

    plan = Plan.load(plan_dir)
    produced = {MODEL_INPUT: random_inputs(plan, batch=1)}
    seconds: dict[str, float] = {}
    for stage in stage_order(plan):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(plan.stage_path(stage.name)), opts,
                                    providers=["CPUExecutionProvider"])
        feeds = {i.tensor.name: produced[i.source][i.tensor.name] for i in stage.inputs}
        names = [o.tensor.name for o in stage.outputs]
        sess.run(names, feeds)
        times = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            values = sess.run(names, feeds)
            times.append(time.perf_counter() - t0)
        produced[stage.name] = dict(zip(names, values, strict=True))
        seconds[stage.name] = statistics.median(times)
    return [seconds[s.name] for s in plan.stages]


def _balance_models() -> dict[str, Any]:
    import keras

    from tests.converter import builders

    def app(name: str) -> Any:
        keras.utils.set_random_seed(0)
        return getattr(keras.applications, name)(weights=None, input_shape=(128, 128, 3),
                                                 classes=100)

    return {"se_cnn": builders.se_cnn(), "transformer": builders.transformer(),
            "gray_cnn": builders.gray_cnn(), "mobilenetv2": app("MobileNetV2"),
            "resnet50": app("ResNet50")}


def balance() -> None:
    import onnx

    from converter import convert
    from converter.api import analyze_model
    from converter.export import load_model
    from converter.split_layer import allowed_cuts

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"{'model':<12} {'nodes':>5} {'cuts':>5} {'K':>2} {'stages':>6} {'estimated':>9} "
          f"{'profiled':>8} {'timed':>6} {'est/timed':>9} {'convert s':>9}")
    with tempfile.TemporaryDirectory(prefix="bench-balance-") as tmp_name:
        tmp = Path(tmp_name)
        for name, model in _balance_models().items():
            src = tmp / f"{name}.onnx"
            onnx.save(load_model(model), str(src))
            analysis, _ = analyze_model(src)
            cuts = len(allowed_cuts(analysis))
            for k in (2, 4, 8):
                out = tmp / f"{name}-k{k}"
                plan, secs = _timed(convert, src, out, by="layer", stages=k, profile=True)
                timed = _timed_stages(out)
                measured = max(timed) / (sum(timed) / len(timed))
                est = plan.split.estimated_balance or 0.0
                print(f"{name:<12} {analysis.n:>5} {cuts:>5} {k:>2} {len(plan.stages):>6} "
                      f"{est:>9.3f} {plan.split.measured_balance or 0.0:>8.3f} {measured:>6.3f} "
                      f"{est / measured:>9.2f} {secs:>9.2f}")


if __name__ == "__main__":
    import sys

    balance() if sys.argv[1:] == ["balance"] else main()
