"""conveyor.wire: round trips, zero-copy views, and what encode refuses."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from conveyor.errors import CodecError, ConfigError
from conveyor.plan import ALLOWED_DTYPES, TensorSpec
from conveyor.wire import Limits, check_tensor, decode, encode


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("float"):
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype.name == want.dtype.name
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_every_allowed_dtype_round_trips(dtype: str) -> None:
    a = sample(dtype, (3, 5))
    decoded = decode(encode({"a": a}))
    assert_same(decoded.tensors["a"], a)


@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (1, 1, 1, 1)])
def test_zero_d_and_empty_tensors_round_trip(shape: tuple[int, ...]) -> None:
    a = sample("float32", shape)
    got = decode(encode({"a": a, "after": np.arange(3)})).tensors
    assert_same(got["a"], a)
    assert_same(got["after"], np.arange(3))


def test_numpy_scalar_encodes_as_zero_d() -> None:
    got = decode(encode({"s": np.float64(2.5)})).tensors["s"]
    assert got.shape == ()
    assert got.dtype == np.float64
    assert got[()] == 2.5


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "uint32", "float16", "float64"])
def test_big_endian_input_is_sent_little_endian(dtype: str) -> None:
    a = sample(dtype, (4, 3)).astype(np.dtype(dtype).newbyteorder(">"))
    body = encode({"a": a})
    _, raw = msgpack.unpackb(body)
    assert raw == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    got = decode(body).tensors["a"]
    assert got.dtype.byteorder in "<=|"
    assert_same(got, a)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: a[::2],
        lambda a: a.T,
        lambda a: np.asfortranarray(a),
        lambda a: a[:, 1:3],
        lambda a: np.broadcast_to(a[:1], a.shape),
    ],
    ids=["strided", "transposed", "fortran", "column-slice", "broadcast"],
)
def test_non_contiguous_input_round_trips(make: object) -> None:
    base = sample("int32", (6, 4))
    a = make(base)  # type: ignore[operator]
    assert not a.flags.c_contiguous
    assert_same(decode(encode({"a": a})).tensors["a"], np.ascontiguousarray(a))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decoded_tensors_are_read_only_zero_copy_views(kind: type) -> None:
    body = kind(encode({"a": sample("float32", (8, 8)), "b": sample("uint8", (5,))}))
    backing = np.frombuffer(body, dtype=np.uint8)
    for t in decode(body).tensors.values():
        assert np.shares_memory(t, backing)
        assert not t.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            t[...] = 0


def test_view_keeps_the_body_alive() -> None:
    a = sample("float64", (100,))
    t = decode(bytearray(encode({"a": a}))).tensors["a"]
    # The only reference to the bytearray is the view's base chain now.
    np.testing.assert_array_equal(t, a)


def test_decode_reads_a_memoryview_into_a_larger_buffer() -> None:
    body = encode({"a": np.arange(10, dtype=np.int64)})
    buffer = b"junk" + body + b"more"
    view = memoryview(buffer)[4 : 4 + len(body)]
    got = decode(view).tensors["a"]
    assert_same(got, np.arange(10, dtype=np.int64))
    assert np.shares_memory(got, np.frombuffer(buffer, np.uint8))


def test_meta_and_tensor_order_round_trip() -> None:
    meta = {"stage": "s1", "n": 3, "x": 1.5, "ok": True, "none": None, "raw": b"\x00\xff",
            "nested": {"list": [1, "two", [3.0]], "map": {"k": []}}}
    tensors = {name: sample("int8", (2,), seed=i) for i, name in enumerate("zyxw")}
    decoded = decode(encode(tensors, meta))
    assert decoded.meta == meta
    assert list(decoded.tensors) == list(tensors)


def test_no_meta_decodes_as_empty_map() -> None:
    assert decode(encode({})).meta == {}
    assert decode(encode({}, None)).tensors == {}


def test_tuples_in_meta_come_back_as_lists() -> None:
    assert decode(encode({}, {"t": (1, 2)})).meta == {"t": [1, 2]}


@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536, 70000])
def test_bin_header_widths_at_their_boundaries(size: int) -> None:
    a = sample("uint8", (size,))
    body = encode({"a": a})
    assert_same(decode(body).tensors["a"], a)
    assert msgpack.unpackb(body)[1] == a.tobytes()


# -- what encode refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        np.zeros(2, np.complex64),
        np.array(["a", "b"]),
        np.array([object()], dtype=object),
        np.zeros(2, "datetime64[s]"),
        np.zeros(2, [("a", "i4")]),
    ],
    ids=["complex64", "str", "object", "datetime64", "structured"],
)
def test_encode_refuses_disallowed_dtypes(value: np.ndarray) -> None:
    with pytest.raises(CodecError, match=r"tensor 'a' has dtype .*allowed"):
        encode({"a": value})


def test_encode_refuses_non_arrays() -> None:
    with pytest.raises(CodecError, match="tensor 'a' is a list, not a numpy array"):
        encode({"a": [1, 2]})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("tensors", "limits", "match"),
    [
        ({"a": np.zeros((1,) * 5)}, Limits(max_dims=4),
         "tensor 'a' has 5 dimensions; the limit is 4"),
        ({str(i): np.zeros(1) for i in range(3)}, Limits(max_tensors=2),
         "3 tensors; the limit is 2"),
        ({"": np.zeros(1)}, Limits(), "tensor name '' is 0 bytes"),
        ({"abcd": np.zeros(1)}, Limits(max_name_bytes=3), "tensor name 'abcd' is 4 bytes"),
        ({3: np.zeros(1)}, Limits(), "tensor name 3 is a int, not a str"),
        ({"a": np.zeros(100)}, Limits(max_message_bytes=500), "message would be 8\\d\\d bytes"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(
    tensors: dict[str, np.ndarray], limits: Limits, match: str
) -> None:
    with pytest.raises(CodecError, match=match):
        encode(tensors, limits=limits)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"a": {1: "x"}}, r"meta\['a'\] has a int key"),
        ({"a": [np.float32(1)]}, r"meta\['a'\]\[0\] is a float32"),
        ({"a": object()}, r"meta\['a'\] is a object"),
        ({"a": 2**70}, "meta cannot be packed"),
    ],
)
def test_encode_refuses_bad_meta(meta: dict[str, object], match: str) -> None:
    with pytest.raises(CodecError, match=match):
        encode({}, meta)  # type: ignore[arg-type]


def test_encode_refuses_meta_over_its_limit() -> None:
    with pytest.raises(CodecError, match=r"meta packs to 10\d bytes; the limit is 100"):
        encode({}, {"s": "x" * 100}, limits=Limits(max_meta_bytes=100))


@pytest.mark.parametrize("field", ["max_message_bytes", "max_tensors", "max_dims"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_limits_must_be_positive_ints(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"Limits.{field} must be a positive int"):
        Limits(**{field: value})  # type: ignore[arg-type]


# -- check_tensor ---------------------------------------------------------------------------

SPEC = TensorSpec("img", "float32", ("batch", 3, 8))


@pytest.mark.parametrize("batch", [1, 7])
def test_check_tensor_accepts_any_batch(batch: int) -> None:
    check_tensor("img", np.zeros((batch, 3, 8), np.float32), SPEC)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 3, 8), np.float64), "tensor 'img': dtype float64, the plan expects float32"),
        (np.zeros((2, 3), np.float32), "has 2 dimensions, the plan expects 3"),
        (np.zeros((2, 4, 8), np.float32), "dimension 1 is 4, the plan expects 3"),
    ],
)
def test_check_tensor_names_the_mismatch(array: np.ndarray, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        check_tensor("img", array, SPEC)


# -- memory: one copy to encode, none to decode ------------------------------------------


def peak_allocation(fn: Callable[[], object]) -> int:
    """Bytes allocated at the peak while ``fn`` runs (numpy and bytes both report here)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak - base


def test_encode_allocates_only_the_body() -> None:
    a = sample("float32", (1_000_000,))
    peak = peak_allocation(lambda: encode({"a": a}))
    assert a.nbytes <= peak < a.nbytes + 64 * 1024


def test_decode_allocates_no_tensor_bytes() -> None:
    body = encode({"a": sample("float32", (1_000_000,)), "b": sample("int64", (1000, 10))})
    assert peak_allocation(lambda: decode(body)) < 64 * 1024


def test_converting_input_costs_one_extra_copy_at_most() -> None:
    a = sample("float64", (500_000,)).astype(">f8")
    peak = peak_allocation(lambda: encode({"a": a}))
    assert peak < 2 * a.nbytes + 64 * 1024
