"""``workers.metrics.Histogram``: what a scrape reads is what was observed.

Observations are buffered and binned at read time; the buckets must be Prometheus' (a
value equal to a bound counts in that bound's bucket), weighted observations must count
``times`` times, and a runner's ``tick`` must keep the buffers bounded without a scrape.
"""

from __future__ import annotations

import bisect
import random

from workers.metrics import FOLD_EVERY, SECONDS_BUCKETS, Histogram, StageTimings


def reference(values: list[tuple[float, int]]) -> list[int]:
    counts = [0] * (len(SECONDS_BUCKETS) + 1)
    for value, times in values:
        counts[bisect.bisect_left(SECONDS_BUCKETS, value)] += times
    return counts


def test_buckets_count_and_sum_match_every_observation() -> None:
    rng = random.Random(3)
    h = Histogram(SECONDS_BUCKETS)
    seen: list[tuple[float, int]] = []
    for _ in range(3):  # reads in between: each read folds what came before it
        for _ in range(1000):
            value = rng.choice([0.0, *SECONDS_BUCKETS, 20.0, rng.random(), rng.random() / 1e3])
            h.observe(value)
            seen.append((value, 1))
        batch = [rng.random() / 10 for _ in range(16)]
        h.observe_all(batch)
        seen += [(v, 1) for v in batch]
        h.observe_n(0.002, 7)
        seen.append((0.002, 7))
        assert h.counts == reference(seen)
        assert h.count == sum(t for _, t in seen)
        assert abs(h.total - sum(v * t for v, t in seen)) < 1e-9
    cumulative = h.buckets()
    assert cumulative[-1] == ("+Inf", h.count)
    assert [n for _, n in cumulative[:-1]] == sorted(n for _, n in cumulative[:-1])
    assert cumulative[0] == ("0.0001", reference(seen)[0])  # 0.0001 itself is "le 0.0001"


def test_a_negative_duration_counts_as_zero() -> None:
    """Durations against another host's clock (a send time) may come out negative."""
    h = Histogram(SECONDS_BUCKETS)
    h.observe(-0.5)
    h.observe_n(-1.0, 2)
    assert h.counts == reference([(0.0, 3)])
    assert h.total == 0.0


def test_merged_histograms_add_up() -> None:
    a, b = Histogram(SECONDS_BUCKETS), Histogram(SECONDS_BUCKETS)
    a.observe(0.01)
    b.observe_n(3.0, 4)
    merged = Histogram(SECONDS_BUCKETS)
    merged.add(a)
    merged.add(b)
    assert merged.count == 5
    assert merged.total == 12.01
    assert merged.counts == reference([(0.01, 1), (3.0, 4)])


def test_tick_folds_so_memory_stays_bounded_without_scrapes() -> None:
    timings = StageTimings()
    for _ in range(3 * FOLD_EVERY):
        timings.compute.observe(0.001)
        timings.queue_wait.observe_n(0.002, 8)
        timings.tick()
    # Never read in between: the buffers were folded by the ticks, not kept whole.
    assert len(timings.compute._values) < FOLD_EVERY
    assert len(timings.queue_wait._weighted) < FOLD_EVERY
    assert timings.compute.count == 3 * FOLD_EVERY
    assert timings.queue_wait.count == 8 * 3 * FOLD_EVERY
