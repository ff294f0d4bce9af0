"""The cost model the splitters balance: seconds per sample, compute plus transfer.

By default a node's time is its FLOP estimate over a nominal ``FLOPS_PER_SECOND`` plus a
fixed ``NODE_SECONDS``;
``profile_costs`` measures it instead with onnxruntime's profiler on this machine. A
stage also pays for the bytes its input cut carries, at a nominal ``BYTES_PER_SECOND``
(encode, broker, decode). Both rates are nominal: only their ratio steers the split.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converter.graph import FREE_OPS, Analysis
from converter.probe import random_feed
from conveyor.errors import ConversionError

log = logging.getLogger(__name__)

FLOPS_PER_SECOND = 5e10
BYTES_PER_SECOND = 1e9
#: What running a node costs beyond its FLOPs (dispatch, a pass over memory). Without it
#: small models were estimated 1.4-1.9x less balanced than they run; with 2 us every model
#: of the issue-11 bench is within 25% at K = 4 (bench/RESULTS.md); 1 us left the small ones
#: 1.2-1.4x off, 4 us over-corrected the grayscale CNN (0.85).
NODE_SECONDS = 2e-6
#: onnxruntime threads while profiling (see profile_costs).
PROFILE_THREADS = 1


@dataclass(frozen=True)
class CostModel:
    #: Seconds per sample of every node, in the analysis' order.
    node_seconds: tuple[float, ...]
    kind: Literal["flops", "profile"] = "flops"
    bytes_per_second: float = BYTES_PER_SECOND

    def transfer(self, nbytes: Any) -> Any:
        """Seconds to send ``nbytes`` (a number or a numpy array of them)."""
        return nbytes / self.bytes_per_second

    def prefix(self) -> np.ndarray:
        """Cumulative compute in front of every position 0..n."""
        return np.concatenate([[0.0], np.cumsum(self.node_seconds)])


def estimate_costs(analysis: Analysis) -> CostModel:
    """FLOPs at ``FLOPS_PER_SECOND`` plus ``NODE_SECONDS`` for every node that computes."""
    return CostModel(tuple(f / FLOPS_PER_SECOND + (0.0 if n.op_type in FREE_OPS else NODE_SECONDS)
                           for f, n in zip(analysis.flops, analysis.nodes, strict=True)),
                     "flops")


def profile_costs(analysis: Analysis, *, runs: int = 10, seed: int = 0) -> CostModel:
    """Measured onnxruntime CPU time per node (batch 1, graph optimisations off, symbolic
    dimensions at ``analysis.dims``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # optimisations off: with them on, fused and re-laid-out nodes lose their names and
    # their times (ResNet50: 3 of 4 stages then looked free)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    # one thread: a stage's time on a busy worker, not how well its ops spread over cores
    # (ResNet50 in 4: 2 threads made the late 1x1 convolutions look 2x cheaper than they run)
    opts.intra_op_num_threads = PROFILE_THREADS
    with tempfile.TemporaryDirectory(prefix="conveyor-profile-") as tmp:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        try:
            sess = ort.InferenceSession(analysis.model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
            # the symbolic dimensions at the sizes the analysis took (--dims)
            feeds = random_feed(analysis.model, 1, analysis.dims, np.random.default_rng(seed))
            for _ in range(runs + 1):
                sess.run(None, feeds)
            trace = Path(sess.end_profiling())
            events = json.loads(trace.read_text())
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ConversionError(f"profiling the model with onnxruntime failed: {exc}") from exc
    per_node: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        name = str(ev.get("name", ""))
        if ev.get("cat") == "Node" and name.endswith("_kernel_time"):
            per_node[name.removesuffix("_kernel_time")].append(float(ev.get("dur", 0)) * 1e-6)
    # the first run warms up; take the median of the rest
    seconds = []
    missing = 0
    for node in analysis.nodes:
        samples = per_node.get(node.name, [])[1:]
        if not samples:
            missing += 1
        seconds.append(float(np.median(samples)) if samples else 0.0)
    if missing:
        log.info("profile: no timing for %d of %d nodes (counted as free)", missing,
                 len(analysis.nodes))
    return CostModel(tuple(seconds), "profile")
