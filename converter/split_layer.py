"""Split by layer: K contiguous runs of the topological order, the slowest one as fast as possible.

A stage ``[a, b)`` costs its compute (nodes a..b-1) plus the transfer of the tensors live
at ``a`` (its input cut). Cuts are allowed only where every live tensor has a batch
dimension (on axis 0, or on another axis: then it crosses batch-first, see
``Analysis.wire_name``), so workers can batch requests at every stage. The optimum is
exact: a dynamic programme over the m allowed positions finds the smallest bottleneck T*
in O(K m log m) (the cost of a stage is c[end] + s[start], which makes each level a
sweep with heaps), then a second one picks, among splits whose stages all cost at most T* (1 +
``BALANCE_SLACK``), the one sending the fewest bytes in total: stage costs closer than
that are within the noise of a profile, and every byte crosses a broker (MobileNetV2 in
two: a cut before a residual add sends its two 100 KB inputs, one node later the sum
alone; the narrower cut served 6% more requests over RabbitMQ, bench/RESULTS.md).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from converter.costs import CostModel
from converter.graph import Analysis
from conveyor.errors import SplitError

INF = float("inf")
#: A split may be this much slower at its slowest stage than the best one if it sends
#: fewer bytes (see the module docstring).
BALANCE_SLACK = 0.03
#: A stage doing less than this fraction of the ideal (total / K) costs a broker hop for
#: nothing (a lone Softmax behind a CNN): ``merge_slivers`` folds it into a neighbour.
MIN_STAGE_FRACTION = 0.02


@dataclass(frozen=True)
class LayerSplit:
    #: Start positions of stages 1..K-1 (stage 0 starts at 0, the last ends at n).
    cuts: tuple[int, ...]
    #: Positions where a cut is allowed (0 < p < n, all live tensors batched).
    allowed: tuple[int, ...]

    def ranges(self, n: int) -> list[tuple[int, int]]:
        bounds = [0, *self.cuts, n]
        return list(itertools.pairwise(bounds))


def allowed_cuts(analysis: Analysis) -> list[int]:
    _, clean = analysis.cut_profile()
    return [p for p in range(1, analysis.n) if clean[p]]


def split_by_layer(analysis: Analysis, costs: CostModel, k: int) -> LayerSplit:
    if k < 1:
        raise SplitError(f"the number of stages must be at least 1, got {k}")
    live_bytes, clean = analysis.cut_profile()
    allowed = [p for p in range(1, analysis.n) if clean[p]]
    if k - 1 > len(allowed):
        raise SplitError(
            f"cannot split into {k} stages: the model has {analysis.n} nodes and only "
            f"{len(allowed)} position(s) where a cut carries batched tensors only "
            f"(at most {len(allowed) + 1} stages)"
        )
    positions = np.array([0, *allowed, analysis.n])
    compute = costs.prefix()[positions]
    transfer = costs.transfer(live_bytes[positions])
    cuts = optimal_cuts(compute, transfer, k, slack=BALANCE_SLACK)
    return LayerSplit(tuple(int(positions[i]) for i in cuts), tuple(allowed))


def merge_slivers(analysis: Analysis, costs: CostModel,
                  split: LayerSplit) -> tuple[LayerSplit, list[str]]:
    """``split`` without stages under ``MIN_STAGE_FRACTION`` of the ideal, and what was merged.

    A sliver goes to the neighbour that stays cheaper with it; the stage count drops by one
    per sliver (the caller says so: the user asked for more stages than the work fills).
    """
    live_bytes, _ = analysis.cut_profile()
    prefix = costs.prefix()
    cuts = list(split.cuts)
    notes: list[str] = []
    while cuts:
        bounds = [0, *cuts, analysis.n]
        cost = [prefix[b] - prefix[a] + costs.transfer(live_bytes[a])
                for a, b in itertools.pairwise(bounds)]
        total = sum(cost) or 1.0
        i = min(range(len(cost)), key=cost.__getitem__)
        if cost[i] >= MIN_STAGE_FRACTION * total / len(cost):
            break
        ops = ", ".join(dict.fromkeys(n.op_type for n in analysis.nodes[bounds[i]:bounds[i + 1]]))
        notes.append(f"stage {i} of {len(cost)} would do {100 * cost[i] / total:.2f}% of the "
                     f"work ({bounds[i + 1] - bounds[i]} node(s): {ops}): merged into its "
                     "neighbour, one broker hop less")
        before = cost[i - 1] if i > 0 else float("inf")
        after = cost[i + 1] if i + 1 < len(cost) else float("inf")
        cuts.pop(i - 1 if before <= after else i)
    return LayerSplit(tuple(cuts), split.allowed), notes


def optimal_cuts(compute: Sequence[float] | np.ndarray, transfer: Sequence[float] | np.ndarray,
                 k: int, *, slack: float = 0.0) -> list[int]:
    """Indices (into the position arrays) of the K-1 cuts minimising the slowest stage.

    ``compute[i]``: cumulative compute in front of position i (non-decreasing, first 0, last
    the total); ``transfer[i]``: what a stage starting at position i pays for its input.
    Among the splits whose slowest stage is within ``slack`` (a fraction) of the least
    possible, the one with the least total transfer, if that is less than the best
    balanced split's.
    """
    c = [float(x) for x in compute]
    s = [float(t) - ci for t, ci in zip(transfer, c, strict=True)]  # cost(i, j) = c[j] + s[i]
    m = len(c)
    if k == 1:
        return []
    if k > m - 1:
        raise SplitError(f"no split into {k} stages exists over {m - 2} cut positions")
    bottleneck = _min_bottleneck(c, s, k)
    best = _cuts(_least_total_within(c, s, k, bottleneck * (1 + 1e-9) + 1e-18), k, m)
    if slack <= 0:
        return best
    near = _cuts(_least_total_within(c, s, k, bottleneck * (1 + slack + 1e-9) + 1e-18), k, m)
    # Give up balance only for fewer bytes, not for as many.
    sent = [float(x) for x in transfer]
    # (a saving under 1e-12 s is no saving: hypothesis found one of 6e-231)
    saved = sum(sent[i] for i in best) * (1 - 1e-9) - sum(sent[i] for i in near)
    return near if saved > 1e-12 else best


def _cuts(parents: list[list[int]], k: int, m: int) -> list[int]:
    cuts: list[int] = []
    j = m - 1
    for level in range(k - 1, 0, -1):
        j = parents[level][j]
        cuts.append(j)
    return sorted(cuts)


def _min_bottleneck(c: list[float], s: list[float], k: int) -> float:
    """min over exactly-k-stage splits of the slowest stage, O(k m log m).

    f_l(j) = min_{i<j} max(f_{l-1}(i), c[j] + s[i]). As j grows, c[j] grows, so candidate i
    is "flat" (worth f_{l-1}(i)) until c[j] passes f_{l-1}(i) - s[i], then "sloped" (worth
    c[j] + s[i]) for good: a heap of flat candidates plus the least s of the sloped ones.
    """
    m = len(c)
    f = [INF] + [c[j] + s[0] for j in range(1, m)]
    for _level in range(1, k):
        new = [INF] * m
        flat: list[tuple[float, int]] = []
        by_threshold: list[tuple[float, int]] = []
        sloped = [False] * m
        least_s = INF
        for j in range(m):
            x = c[j]
            while by_threshold and by_threshold[0][0] < x:
                _, i = heapq.heappop(by_threshold)
                sloped[i] = True
                least_s = min(least_s, s[i])
            while flat and sloped[flat[0][1]]:
                heapq.heappop(flat)
            best = flat[0][0] if flat else INF
            new[j] = min(best, x + least_s)
            if f[j] < INF:
                heapq.heappush(flat, (f[j], j))
                heapq.heappush(by_threshold, (f[j] - s[j], j))
        f = new
    return f[m - 1]


def _least_total_within(c: list[float], s: list[float], k: int,
                        limit: float) -> list[list[int]]:
    """Parents of the exactly-k-stage split with least total cost, every stage <= limit.

    g_l(j) = c[j] + min {g_{l-1}(i) + s[i] : i < j, s[i] <= limit - c[j]}; the bound only
    tightens as j grows, so a candidate once out stays out (lazy deletion from a heap).
    """
    m = len(c)
    g = [INF] + [c[j] + s[0] if c[j] + s[0] <= limit else INF for j in range(1, m)]
    parents: list[list[int]] = [[0] * m]
    for _level in range(1, k):
        new = [INF] * m
        arg = [0] * m
        heap: list[tuple[float, int]] = []
        for j in range(m):
            bound = limit - c[j]
            while heap and s[heap[0][1]] > bound:
                heapq.heappop(heap)
            if heap:
                new[j], arg[j] = c[j] + heap[0][0], heap[0][1]
            if g[j] < INF:
                heapq.heappush(heap, (g[j] + s[j], j))
        g = new
        parents.append(arg)
    if g[m - 1] == INF:  # cannot happen: the bottleneck split itself qualifies
        raise SplitError(f"no split into {k} stages within the bottleneck {limit}")
    return parents
