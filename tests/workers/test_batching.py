"""Micro-batching: size limit, wait policies, shape compatibility, per-request split."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from conveyor import wire
from conveyor.errors import ConfigError
from conveyor.packs import split_rows
from workers.batching import (
    VIEW_FROM_BYTES,
    MicroBatcher,
    concat,
    shape_key,
    split,
)


def x(rows: int, width: int = 4, dtype: str = "float32") -> dict[str, np.ndarray]:
    return {"x": np.arange(rows * width, dtype=dtype).reshape(rows, width)}


async def test_full_batch_is_released_without_waiting_for_the_delay() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=4, max_delay_ms=60_000)
    for i in range(6):
        b.put(i, "k")
    batch = await asyncio.wait_for(b.next_batch(), 1.0)
    assert batch == [0, 1, 2, 3]
    assert len(b) == 2


async def test_window_policy_waits_for_max_delay_from_the_first_request() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=50, policy="window")
    started = time.monotonic()
    b.put(1, "k")
    b.put(2, "k")
    batch = await asyncio.wait_for(b.next_batch(), 2.0)
    assert batch == [1, 2]
    assert time.monotonic() - started >= 0.045


async def test_idle_stage_takes_a_partial_batch_without_waiting_for_the_window() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=60_000)
    b.put(1, "k")
    b.put(2, "k")
    assert await asyncio.wait_for(b.next_batch(), 1.0) == [1, 2]


async def test_idle_stage_takes_the_rest_of_a_burst_that_is_still_arriving() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=60_000)

    async def burst() -> None:
        for i in range(5):  # one request per turn of the event loop
            b.put(i, "k")
            await asyncio.sleep(0)

    sender = asyncio.create_task(burst())
    batch = await asyncio.wait_for(b.next_batch(), 1.0)
    await sender
    assert batch == [0, 1, 2, 3, 4]


async def test_busy_stage_keeps_filling_until_it_can_run() -> None:
    free = asyncio.Event()
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=0, can_run=free.is_set)
    taker = asyncio.create_task(b.next_batch())
    for i in range(3):
        b.put(i, "k")
        await asyncio.sleep(0)
    assert not taker.done()
    free.set()
    b.poke()
    assert await asyncio.wait_for(taker, 1.0) == [0, 1, 2]


async def test_busy_stage_still_gets_full_batches() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=2, max_delay_ms=0, can_run=lambda: False)
    for i in range(3):
        b.put(i, "k")
    assert await asyncio.wait_for(b.next_batch(), 1.0) == [0, 1]


async def test_zero_delay_releases_at_once() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=0)
    b.put(7, "k")
    assert await asyncio.wait_for(b.next_batch(), 1.0) == [7]


async def test_incompatible_shapes_never_share_a_batch() -> None:
    b: MicroBatcher[str] = MicroBatcher(max_batch=3, max_delay_ms=20, policy="window")
    for name, t in [("a", x(1)), ("b", x(1, width=5)), ("c", x(1)), ("d", x(1, dtype="float64"))]:
        b.put(name, shape_key(t))
    batches = [await asyncio.wait_for(b.next_batch(), 1.0) for _ in range(3)]
    assert sorted(map(sorted, batches)) == [["a", "c"], ["b"], ["d"]]
    # The oldest group (first arrival "a") is released first.
    assert batches[0] == ["a", "c"]


async def test_rows_count_against_max_batch() -> None:
    b: MicroBatcher[str] = MicroBatcher(max_batch=4, max_delay_ms=60_000)
    b.put("three", "k", rows=3)
    b.put("two", "k", rows=2)  # would make 5: the first group goes alone
    assert await asyncio.wait_for(b.next_batch(), 1.0) == ["three"]
    b.put("big", "other", rows=9)  # alone over the limit: runs alone
    assert await asyncio.wait_for(b.next_batch(), 1.0) == ["big"]


async def test_close_hands_out_what_is_left_then_empty() -> None:
    b: MicroBatcher[int] = MicroBatcher(max_batch=10, max_delay_ms=60_000)
    b.put(1, "k")
    b.close()
    assert await b.next_batch() == [1]
    assert await b.next_batch() == []


def test_concat_and_split_round_trip_per_request() -> None:
    parts = [x(1), x(3), x(2)]
    joined = concat(parts)
    assert joined["x"].shape == (6, 4)
    pieces = split({"y": joined["x"] * 2}, [1, 3, 2])
    for part, piece in zip(parts, pieces, strict=True):
        np.testing.assert_array_equal(piece["y"], part["x"] * 2)


def test_concat_of_consecutive_rows_of_one_message_is_a_view() -> None:
    # The requests of one pack arrive as row slices of one decoded tensor.
    width = VIEW_FROM_BYTES // 4  # a batch big enough to be worth a view
    body = wire.decode(wire.encode({"x": np.arange(6 * width, dtype=np.float32).reshape(6, -1)}))
    message = body.tensors["x"]
    parts = split_rows({"x": message}, [2, 1, 3])
    joined = concat(parts)["x"]
    np.testing.assert_array_equal(joined, message)
    assert np.shares_memory(joined, message)
    assert not joined.flags.writeable


def test_concat_copies_small_batches_even_of_consecutive_rows() -> None:
    message = np.arange(24, dtype=np.float32).reshape(6, 4)
    joined = concat(split_rows({"x": message}, [2, 1, 3]))["x"]
    np.testing.assert_array_equal(joined, message)
    assert not np.shares_memory(joined, message)


@pytest.mark.parametrize("order", [[0, 2], [1, 0, 2], [2, 1, 0]])
def test_concat_copies_rows_that_are_not_consecutive(order: list[int]) -> None:
    message = np.arange(6 * VIEW_FROM_BYTES, dtype=np.float32).reshape(6, -1)
    rows = split_rows({"x": message}, [2, 1, 3])
    parts = [rows[i] for i in order]
    joined = concat(parts)["x"]
    np.testing.assert_array_equal(joined, np.concatenate([p["x"] for p in parts]))
    assert not np.shares_memory(joined, message)


def test_split_refuses_outputs_without_matching_rows() -> None:
    with pytest.raises(ValueError, match="expected 3 rows"):
        split({"y": np.zeros((2, 4))}, [1, 2])


def test_limits_are_checked() -> None:
    with pytest.raises(ConfigError):
        MicroBatcher(0, 1.0)
    with pytest.raises(ConfigError):
        MicroBatcher(1, -1.0)
    with pytest.raises(ConfigError):
        MicroBatcher(1, 1.0, policy="sometimes")  # type: ignore[arg-type]


async def test_a_closed_loop_of_one_caller_does_not_wait_for_a_next_request() -> None:
    """One caller that sends its next request only after the answer: waiting for a next
    request cannot pay, so after one wait that nobody ended, batches go at once."""
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=50)
    waits = []
    for i in range(20):
        b.put(i, "k")
        started = time.monotonic()
        assert await asyncio.wait_for(b.next_batch(), 1.0) == [i]
        waits.append(time.monotonic() - started)
        await asyncio.sleep(0.002)  # the answer travels back; the caller sends again
    # The first waits may try (gaps of ~2 ms look "often"); the rest must not wait ~4 ms.
    late = sorted(waits[5:])
    assert late[len(late) // 2] < 0.001, [f"{w * 1e3:.2f} ms" for w in waits]


async def test_requests_arriving_often_on_their_own_still_share_batches() -> None:
    """Arrivals that do not wait for answers (many callers): waiting pays, and is kept."""
    b: MicroBatcher[int] = MicroBatcher(max_batch=100, max_delay_ms=20)

    async def callers() -> None:
        for i in range(60):
            b.put(i, "k")
            await asyncio.sleep(0.001)

    producing = asyncio.create_task(callers())
    batches = []
    while not producing.done() or len(b):
        batches.append(await asyncio.wait_for(b.next_batch(), 1.0))
    await producing
    assert sorted(i for batch in batches for i in batch) == list(range(60))
    assert len(batches) <= 30, [len(x) for x in batches]  # mean batch of 2 or more
