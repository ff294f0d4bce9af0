"""The layer split's dynamic programme is exact: it matches brute force on small instances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converter.costs import CostModel, estimate_costs
from converter.export import prepare
from converter.graph import analyze
from converter.split_layer import optimal_cuts, split_by_layer
from conveyor.errors import SplitError
from tests.converter import graphs


def _bottleneck(c: np.ndarray, t: np.ndarray, cuts: list[int]) -> float:
    bounds = [0, *cuts, len(c) - 1]
    return max(c[b] - c[a] + t[a] for a, b in itertools.pairwise(bounds))


@settings(max_examples=150, deadline=None)
@given(
    compute=st.lists(st.floats(0, 100), min_size=2, max_size=9),
    transfer=st.lists(st.floats(0, 100), min_size=10, max_size=10),
    k=st.integers(2, 5),
)
def test_optimal_cuts_match_brute_force(compute: list[float], transfer: list[float],
                                        k: int) -> None:
    c = np.concatenate([[0.0], np.cumsum(compute)])
    t = np.array(transfer[: len(c)])
    m = len(c)
    if k > m - 1:
        return
    cuts = optimal_cuts(c, t, k)
    assert len(cuts) == k - 1 and cuts == sorted(set(cuts)) and cuts[0] > 0 and cuts[-1] < m - 1
    best = min(_bottleneck(c, t, list(comb)) for comb in itertools.combinations(range(1, m - 1),
                                                                                 k - 1))
    assert _bottleneck(c, t, cuts) == pytest.approx(best, rel=1e-9, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(
    compute=st.lists(st.floats(0, 100), min_size=2, max_size=9),
    transfer=st.lists(st.floats(0, 100), min_size=10, max_size=10),
    k=st.integers(2, 5),
)
def test_with_slack_the_least_transfer_among_nearly_best_splits(
    compute: list[float], transfer: list[float], k: int
) -> None:
    c = np.concatenate([[0.0], np.cumsum(compute)])
    t = np.array(transfer[: len(c)])
    m = len(c)
    if k > m - 1:
        return
    cuts = optimal_cuts(c, t, k, slack=0.1)
    splits = [list(comb) for comb in itertools.combinations(range(1, m - 1), k - 1)]
    best = min(_bottleneck(c, t, cut) for cut in splits)
    assert _bottleneck(c, t, cuts) <= best * (1 + 0.1) * (1 + 1e-9) + 1e-12
    near = [cut for cut in splits if _bottleneck(c, t, cut) <= best * 1.1 * (1 + 1e-12) + 1e-15]
    least = min(sum(t[i] for i in cut) for cut in near)
    assert sum(t[i] for i in cuts) == pytest.approx(least, rel=1e-9, abs=1e-9)
    if _bottleneck(c, t, cuts) > best * (1 + 1e-9) + 1e-12:
        # Balance was given up only for fewer bytes than every best-balanced split sends.
        balanced = [cut for cut in splits if _bottleneck(c, t, cut) <= best * (1 + 1e-9) + 1e-12]
        assert sum(t[i] for i in cuts) < min(sum(t[i] for i in cut) for cut in balanced)


def test_slack_trades_a_little_balance_for_a_narrower_cut() -> None:
    # A cut at 2: stages of 20 and 20 + 1.0 sent; one node later: 21.5 and 18.5 + 0.5
    # sent. The slowest stage is 2.4% slower, the bytes halve.
    c = np.array([0.0, 10.0, 20.0, 21.5, 30.0, 40.0])
    t = np.array([0.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    assert optimal_cuts(c, t, 2) == [2]
    assert optimal_cuts(c, t, 2, slack=0.03) == [3]
    # Beyond the slack, balance wins.
    assert optimal_cuts(c, t, 2, slack=0.001) == [2]


def test_transfer_cost_steers_the_cut_to_the_narrow_tensor() -> None:
    # two equal halves of compute; the cut in the middle carries 100x more than one node later
    c = np.array([0.0, 10.0, 20.0, 20.5, 30.0, 40.0])
    t = np.array([0.0, 0.0, 50.0, 0.5, 0.0, 0.0])
    assert optimal_cuts(c, t, 2) == [3]


def test_too_many_stages_is_a_split_error() -> None:
    analysis = analyze(prepare(graphs.wide(layers=2)))
    with pytest.raises(SplitError, match="at most 4 stages"):
        split_by_layer(analysis, estimate_costs(analysis), 5)


def test_profiled_costs_replace_the_estimate() -> None:
    from converter.costs import profile_costs

    analysis = analyze(prepare(graphs.wide(size=128, layers=3)))
    costs = profile_costs(analysis, runs=3)
    assert costs.kind == "profile"
    assert len(costs.node_seconds) == analysis.n
    matmuls = [s for s, n in zip(costs.node_seconds, analysis.nodes, strict=True)
               if n.op_type == "MatMul"]
    assert all(s > 0 for s in matmuls), costs.node_seconds
    split = split_by_layer(analysis, costs, 3)
    assert len(split.cuts) == 2


def test_cost_model_prefix_is_cumulative() -> None:
    costs = CostModel((1.0, 2.0, 3.0))
    assert list(costs.prefix()) == [0.0, 1.0, 3.0, 6.0]


def test_a_stage_with_next_to_no_work_is_merged_and_said_so() -> None:
    from converter.split_layer import LayerSplit, merge_slivers

    analysis = analyze(prepare(graphs.wide(layers=3)))
    n = analysis.n
    seconds = [1.0] * (n - 1) + [1e-9]  # the last node (a lone Tanh) does nothing
    costs = CostModel(tuple(seconds), "profile", bytes_per_second=1e30)
    split = split_by_layer(analysis, costs, 3)
    sliver = LayerSplit((*split.cuts[:1], n - 1), split.allowed)
    merged, notes = merge_slivers(analysis, costs, sliver)
    assert merged.cuts == sliver.cuts[:1]
    assert len(notes) == 1 and "stage 2 of 3" in notes[0] and "merged" in notes[0]
    kept, none = merge_slivers(analysis, costs, split)  # a balanced split stays as it is
    assert kept.cuts == split.cuts and none == []
