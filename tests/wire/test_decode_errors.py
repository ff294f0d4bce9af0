"""Every way decode refuses a body: CodecError naming what was wrong, nothing else."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from conveyor.errors import CodecError
from conveyor.wire import Limits, decode, encode


def entry(
    name: str = "x", dtype: str = "float32", shape: list[Any] | None = None
) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": [2, 3] if shape is None else shape}


def body(header: Any, *bins: Any) -> bytes:
    """A body as any msgpack client would build it."""
    return msgpack.packb([header, *bins])


def good_header(*entries: dict[str, Any], meta: Any = None) -> dict[str, Any]:
    h: dict[str, Any] = {"v": 1, "tensors": list(entries) or [entry()]}
    if meta is not None:
        h["meta"] = meta
    return h


RAW = bytes(24)  # 2 x 3 float32


def test_a_well_formed_plain_body_decodes() -> None:
    # The reference the error cases below each break in one place.
    got = decode(body(good_header(), RAW)).tensors["x"]
    assert got.shape == (2, 3)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "message truncated: expected the message"),
        (msgpack.packb({"v": 1}), "expected the message \\(a msgpack array\\) at offset 0, "
                                  "found msgpack byte 0x81"),
        (msgpack.packb([]), "message is an empty array"),
        (b"\xdd\xff\xff\xff\xff", "message declares 4294967294 tensors; the limit is 256"),
        (b"\xdc\x00", "message truncated inside the header of the message"),
        (body([1, 2]), "message header is a list; expected a map"),
        (body({**good_header(), "extra": 1}, RAW), "unknown keys \\['extra'\\]"),
        (body({"tensors": [entry()]}, RAW), "wire format version None; this decoder reads 1"),
        (body({**good_header(), "v": 2}, RAW), "wire format version 2"),
        (body({**good_header(), "v": True}, RAW), "wire format version True"),
        (body(good_header(meta=[1]), RAW), "header 'meta' is a list; expected a map"),
        (body(good_header(meta={b"k": 1}), RAW), "meta has a bytes key"),
        (body(good_header(meta={"a": {"b": {b"k": 1}}}), RAW), r"meta\['a'\]\['b'\] has a bytes"),
        (body({"v": 1, "tensors": {}}), "header 'tensors' is a dict; expected an array"),
        (body(good_header(entry(), entry("y")), RAW), "header lists 2 tensors but the message "
                                                      "carries 1 tensor bins"),
        (body({"v": 1, "tensors": [[1]]}, RAW), "tensor entry 0 is a list; expected a map"),
        (body({"v": 1, "tensors": [{"name": "x", "dtype": "int8"}]}, RAW),
         "tensor entry 0 has keys \\['dtype', 'name'\\]; expected \\['dtype', 'name', 'shape'\\]"),
        (body({"v": 1, "tensors": [{**entry(), "strides": [1]}]}, RAW), "tensor entry 0 has keys"),
        (body(good_header(entry(name=7)), RAW), "tensor entry 0: tensor name 7 is a int"),  # type: ignore[arg-type]
        (body(good_header(entry(name="")), RAW), "tensor entry 0: tensor name '' is 0 bytes"),
        (body(good_header(entry(name="n" * 257)), RAW), "is 257 bytes; names take 1 to 256"),
        (body(good_header(entry(), entry()), RAW, RAW), "tensor name 'x' appears more than once"),
        (body(good_header(entry(dtype="complex64")), RAW), "tensor 'x': dtype 'complex64' is not "
                                                           "allowed"),
        (body(good_header(entry(dtype="object")), RAW), "dtype 'object' is not allowed"),
        (body(good_header(entry(dtype=5)), RAW), "dtype 5 is not allowed"),  # type: ignore[arg-type]
        (body(good_header(entry(dtype="<f4")), RAW), "dtype '<f4' is not allowed"),
        (body(good_header(entry(shape=6)), RAW), "tensor 'x': shape is a int"),  # type: ignore[arg-type]
        (body(good_header(entry(shape=[2, -3])), RAW), "dimension 1 is -3; expected an int >= 0"),
        (body(good_header(entry(shape=[2.0, 3])), RAW), "dimension 0 is 2.0"),
        (body(good_header(entry(shape=[True, 3])), RAW), "dimension 0 is True"),
        (body(good_header(entry(shape=[1] * 17)), RAW),
         "tensor 'x': 17 dimensions; the limit is 16"),
        (body(good_header(), bytes(20)), "tensor 'x': float32\\[2, 3\\] needs 24 bytes, its bin "
                                         "holds 20"),
        (body(good_header(entry(shape=[2**40, 2**40])), RAW),
         f"needs {2**80 * 4} bytes, its bin holds 24"),
        (body(good_header(), "not bytes"), "expected tensor 0 \\('x'\\), a bin, at offset \\d+, "
                                           "found msgpack byte 0xa9"),
        (body(good_header(), RAW)[:-26], "message truncated: expected tensor 0"),
        (body(good_header()), "header lists 1 tensors but the message carries 0 tensor bins"),
        (body(good_header(), RAW)[:-1], "tensor 'x': message truncated: its 24 bytes start at"),
        (body(good_header(), RAW)[:12], "message truncated inside its header"),
        (body(good_header(), RAW) + b"\x00\x01", "2 bytes of trailing garbage after the last "
                                                 "tensor"),
        (body(good_header(meta={"t": msgpack.ExtType(1, b"x")}), RAW), "malformed message"),
        (body(good_header(meta={1: 2}), RAW), "malformed message: ValueError"),
        (b"\x92\xc1", "malformed message"),
    ],
)
def test_decode_names_what_is_wrong(data: bytes, match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode(data)


def test_non_utf8_string_in_header() -> None:
    good = body(good_header(entry(name="ab")), RAW)
    bad = good.replace(b"\xa2ab", b"\xa2\xff\xfe")
    with pytest.raises(CodecError, match="malformed message: UnicodeDecodeError"):
        decode(bad)


@pytest.mark.parametrize("value", ["text", [1, 2], None, 42])
def test_decode_refuses_bodies_that_are_not_bytes(value: object) -> None:
    with pytest.raises(CodecError, match="message body must be bytes"):
        decode(value)  # type: ignore[arg-type]


def test_decode_refuses_a_non_contiguous_memoryview() -> None:
    strided = memoryview(encode({"a": np.zeros(4)}) * 2)[::2]
    with pytest.raises(CodecError, match="non-contiguous"):
        decode(strided)


def test_message_over_the_size_limit_is_refused_before_parsing() -> None:
    data = encode({"a": np.zeros(100)})
    with pytest.raises(CodecError, match=f"message is {len(data)} bytes; the limit is 500"):
        decode(data, Limits(max_message_bytes=500))


def test_tensor_count_over_the_limit() -> None:
    data = encode({str(i): np.zeros(1) for i in range(3)})
    with pytest.raises(CodecError, match="message declares 3 tensors; the limit is 2"):
        decode(data, Limits(max_tensors=2))


def test_name_and_dims_limits_are_the_decoders() -> None:
    data = encode({"abcd": np.zeros((1, 1, 1))})
    with pytest.raises(CodecError, match="tensor name 'abcd' is 4 bytes; names take 1 to 3"):
        decode(data, Limits(max_name_bytes=3))
    with pytest.raises(CodecError, match="tensor 'abcd': 3 dimensions; the limit is 2"):
        decode(data, Limits(max_dims=2))


def test_meta_over_its_limit() -> None:
    data = encode({}, {"items": list(range(200))})
    with pytest.raises(CodecError, match=r"meta is \d+ bytes; the limit is 150"):
        decode(data, Limits(max_meta_bytes=150))


def test_meta_string_over_the_meta_limit() -> None:
    data = encode({}, {"s": "x" * 200})
    with pytest.raises(CodecError, match=r"malformed message: ValueError: .*max_str_len"):
        decode(data, Limits(max_meta_bytes=150))


def test_header_longer_than_the_limits_allow() -> None:
    limits = Limits(max_meta_bytes=100, max_tensors=1, max_dims=1, max_name_bytes=1)
    data = encode({}, {"items": [[1] * 100] * 4})
    with pytest.raises(CodecError, match=f"header is longer than the {limits.max_header_bytes}"):
        decode(data, limits)


def test_header_beyond_the_first_read_is_found() -> None:
    # A header longer than the first bytes the decoder reads (4 KiB) still decodes.
    meta = {"blob": b"\x01" * 100_000}
    decoded = decode(encode({"a": np.arange(3)}, meta))
    assert decoded.meta == meta
    np.testing.assert_array_equal(decoded.tensors["a"], np.arange(3))


def test_translated_errors_keep_their_cause() -> None:
    with pytest.raises(CodecError) as info:
        decode(b"\x92\xc1")
    assert info.value.__cause__ is not None
