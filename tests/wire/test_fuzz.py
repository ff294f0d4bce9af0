"""Fuzzing decode: random and mutated bodies never raise anything but CodecError.

Five strategies, 10,500 examples in all, derandomized (the same examples on every run,
no example database). Each test counts the bodies it really fed to ``decode``.
Bodies ``decode`` accepts must still hold read-only views into the body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor.errors import CodecError
from conveyor.plan import ALLOWED_DTYPES
from conveyor.wire import DEFAULT_LIMITS, Limits, decode, encode

LIMITS = st.sampled_from(
    [
        DEFAULT_LIMITS,
        Limits(max_message_bytes=64),
        Limits(max_tensors=1, max_dims=2, max_name_bytes=2, max_meta_bytes=16),
    ]
)


def feed(data: bytes, limits: Limits) -> None:
    """Decode ``data``; CodecError is fine, any other exception fails the test."""
    try:
        decoded = decode(data, limits)
    except CodecError:
        return
    backing = np.frombuffer(data, np.uint8)
    for t in decoded.tensors.values():
        assert not t.flags.writeable
        assert t.nbytes == 0 or np.shares_memory(t, backing)


def fuzz(strategy: st.SearchStrategy[bytes], examples: int) -> int:
    """Run ``examples`` derandomized examples of ``strategy``; return how many were fed."""
    fed = 0

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy, LIMITS)
    def check(data: bytes, limits: Limits) -> None:
        nonlocal fed
        fed += 1
        feed(data, limits)

    check()
    return fed


def _seed_bodies() -> list[bytes]:
    rng = np.random.default_rng(0)
    bodies = [
        encode({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}),
        encode({"s": np.float64(1.5), "e": np.zeros((0, 2), np.int8)}, {"trace": "t"}),
        encode({}, {"k": [1, {"a": b"\x00"}]}),
    ]
    for dtype in sorted(ALLOWED_DTYPES):
        array = (rng.random((2, 2)) * 100).astype(dtype)
        bodies.append(encode({"t" + dtype: array, "u": array[:1]}))
    return bodies


SEEDS = _seed_bodies()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "set", "grow"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "grow":  # a length field turned huge
            data[at : at + 4] = b"\xff\xff\xff\xff"
    return bytes(data)


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
_STRUCTURES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.integers(-5, 5) | st.binary(max_size=3), inner,
                      max_size=4),
    max_leaves=16,
)


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


@st.composite
def plausible(draw: st.DrawFn) -> bytes:
    """Bodies shaped like ours, with one or more fields wrong (or none)."""
    entries: list[dict[Any, Any]] = []
    bins: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from([*sorted(ALLOWED_DTYPES), "complex64", "object", "<f4"]))
        shape = draw(st.lists(st.integers(0, 3) | st.integers(-(2**63), 2**64 - 1), max_size=4))
        entry: dict[Any, Any] = {"name": draw(st.text(max_size=3)), "dtype": dtype,
                                 "shape": shape}
        if draw(st.integers(0, 9)) == 0:
            entry[draw(st.sampled_from(["name", "dtype", "shape", 1]))] = draw(_STRUCTURES)
        entries.append(entry)
        size = int(np.prod(shape, dtype=object)) * (
            np.dtype(dtype).itemsize if dtype in ALLOWED_DTYPES else 1)
        exact = draw(st.booleans()) and 0 <= size <= 256
        bins.append(draw(st.binary(min_size=size, max_size=size) if exact
                         else st.binary(max_size=32)))
    if draw(st.integers(0, 4)) == 0:
        bins = bins[: draw(st.integers(0, len(bins)))] + draw(st.lists(st.binary(), max_size=2))
    header: dict[Any, Any] = {"v": draw(st.sampled_from([1, 1, 1, 2, 0, True, None])),
                              "tensors": entries}
    if draw(st.booleans()):
        header["meta"] = draw(st.dictionaries(st.text(max_size=4), _STRUCTURES, max_size=3))
    return _pack([header, *bins]) + draw(st.sampled_from([b"", b"", b"\x00"]))


_HUGE_HEADS = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 items
    b"\xdc\xff\xff",
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc5\xff\xff",
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
]


@st.composite
def huge_lengths(draw: st.DrawFn) -> bytes:
    """Valid framing up to a point, then a length (or dimension) far beyond the body."""
    seed = draw(st.sampled_from(SEEDS))
    at = draw(st.integers(0, len(seed)))
    head = draw(st.sampled_from(_HUGE_HEADS))
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(2**31, 2**64 - 1), min_size=1, max_size=3))
        header = {"v": 1, "tensors": [{"name": "x", "dtype": "float64", "shape": shape}]}
        return b"\x92" + _pack(header) + head + draw(st.binary(max_size=16))
    return seed[:at] + head + draw(st.binary(max_size=16))


STRATEGIES: dict[str, tuple[Callable[[], st.SearchStrategy[bytes]], int]] = {
    "random-bytes": (lambda: st.binary(max_size=300) | st.binary().map(lambda b: b"\x92" + b),
                     2500),
    "mutated": (mutated, 4000),
    "msgpack-structures": (lambda: _STRUCTURES.map(_pack), 1500),
    "plausible": (plausible, 1500),
    "huge-lengths": (huge_lengths, 1000),
}


def test_the_strategies_add_up_to_ten_thousand() -> None:
    assert sum(n for _, n in STRATEGIES.values()) >= 10_000


def test_seed_bodies_decode() -> None:
    # The mutations start from valid bodies, so they probe past the first byte.
    for body in SEEDS:
        decode(body)


def test_fuzz_random_bytes() -> None:
    make, n = STRATEGIES["random-bytes"]
    assert fuzz(make(), n) >= n


def test_fuzz_mutated_messages() -> None:
    make, n = STRATEGIES["mutated"]
    assert fuzz(make(), n) >= n


def test_fuzz_random_msgpack_structures() -> None:
    make, n = STRATEGIES["msgpack-structures"]
    assert fuzz(make(), n) >= n


def test_fuzz_plausible_headers() -> None:
    make, n = STRATEGIES["plausible"]
    assert fuzz(make(), n) >= n


def test_fuzz_huge_declared_lengths() -> None:
    make, n = STRATEGIES["huge-lengths"]
    assert fuzz(make(), n) >= n
