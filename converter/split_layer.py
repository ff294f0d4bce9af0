"""Split by layer: K contiguous runs of the topological order, the slowest one as fast as possible.

A stage ``[a, b)`` costs its compute (nodes a..b-1) plus the transfer of the tensors live
at ``a`` (its input cut). Cuts are allowed only where every live tensor has a batch
dimension, so workers can batch requests at every stage. The optimum is exact: a dynamic
programme over the allowed positions (vectorised with numpy, O(K * m^2) for m positions)
finds the smallest bottleneck T*, then a second one picks, among splits whose stages all
cost at most T*, the one sending the fewest bytes in total.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from converter.costs import CostModel
from converter.graph import Analysis
from conveyor.errors import SplitError

_CHUNK = 2048


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
    allowed = allowed_cuts(analysis)
    if k - 1 > len(allowed):
        raise SplitError(
            f"cannot split into {k} stages: the model has {analysis.n} nodes and only "
            f"{len(allowed)} position(s) where a cut carries batched tensors only "
            f"(at most {len(allowed) + 1} stages)"
        )
    live_bytes, _ = analysis.cut_profile()
    positions = np.array([0, *allowed, analysis.n])
    compute = costs.prefix()[positions]
    transfer = np.array([costs.transfer(live_bytes[p]) for p in positions])
    cuts = optimal_cuts(compute, transfer, k)
    return LayerSplit(tuple(int(positions[i]) for i in cuts), tuple(allowed))


def optimal_cuts(compute: Sequence[float] | np.ndarray, transfer: Sequence[float] | np.ndarray,
                 k: int) -> list[int]:
    """Indices (into the position arrays) of the K-1 cuts minimising the slowest stage.

    ``compute[i]``: cumulative compute in front of position i (non-decreasing, first 0, last
    the total); ``transfer[i]``: what a stage starting at position i pays for its input.
    """
    c = np.asarray(compute, dtype=np.float64)
    t = np.asarray(transfer, dtype=np.float64)
    m = len(c)
    if k == 1:
        return []
    start = t - c  # cost(i, j) = c[j] + start[i]
    # phase 1: the smallest bottleneck with exactly k stages
    best = _dp(c, start, k, lambda prev, cost: np.maximum(prev, cost), None)
    bottleneck = best[-1]
    if not np.isfinite(bottleneck):
        raise SplitError(f"no split into {k} stages exists over {m - 2} cut positions")
    # phase 2: the least total cost (fewest transfer bytes) among splits within it
    limit = bottleneck * (1 + 1e-9) + 1e-18
    parents: list[np.ndarray] = []
    _dp(c, start, k, lambda prev, cost: prev + cost, limit, parents)
    cuts: list[int] = []
    j = m - 1
    for level in range(k - 1, 0, -1):
        j = int(parents[level][j])
        cuts.append(j)
    return sorted(cuts)


def _dp(c: np.ndarray, start: np.ndarray, k: int, combine: object, limit: float | None,
        parents: list[np.ndarray] | None = None) -> np.ndarray:
    """f_1..f_k over positions; returns f_k. ``combine(prev, cost)`` is max or sum."""
    m = len(c)
    f = c + start[0]  # one stage covering [0, j)
    f[0] = np.inf
    if limit is not None:
        f = np.where(f <= limit, f, np.inf)
    if parents is not None:
        parents.append(np.zeros(m, dtype=np.int64))
    idx = np.arange(m)
    for _level in range(1, k):
        new = np.full(m, np.inf)
        arg = np.zeros(m, dtype=np.int64)
        for j0 in range(0, m, _CHUNK):
            js = idx[j0 : j0 + _CHUNK]
            cost = c[js][None, :] + start[:, None]  # [i, j]
            valid = idx[:, None] < js[None, :]
            if limit is not None:
                valid &= cost <= limit
            val = combine(f[:, None], cost)  # type: ignore[operator]
            val = np.where(valid, val, np.inf)
            arg[js] = np.argmin(val, axis=0)
            new[js] = val[arg[js], np.arange(len(js))]
        f = new
        if parents is not None:
            parents.append(arg)
    return np.asarray(f)
