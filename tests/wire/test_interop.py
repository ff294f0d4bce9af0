"""The body is plain msgpack: other clients build it with packb and read it with unpackb."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from conveyor.plan import ALLOWED_DTYPES
from conveyor.wire import decode, encode
from tests.wire.test_codec import assert_same, sample


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_plain_packb_body_decodes_with_ours(dtype: str) -> None:
    a = sample(dtype, (2, 3))
    header = {"v": 1, "meta": {"request": "r1"},
              "tensors": [{"name": "a", "dtype": dtype, "shape": [2, 3]}]}
    data = msgpack.packb([header, a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()])
    decoded = decode(data)
    assert_same(decoded.tensors["a"], a)
    assert decoded.meta == {"request": "r1"}


def test_plain_body_with_keys_in_another_order_and_no_meta() -> None:
    header = {"tensors": [{"shape": [3], "dtype": "int64", "name": "ids"}], "v": 1}
    data = msgpack.packb([header, np.arange(3, dtype="<i8").tobytes()])
    decoded = decode(data)
    assert_same(decoded.tensors["ids"], np.arange(3, dtype=np.int64))
    assert decoded.meta == {}


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_our_body_reads_with_plain_unpackb(dtype: str) -> None:
    tensors = {"a": sample(dtype, (4, 2)), "b": sample(dtype, ())}
    data = encode(tensors, {"k": [1, 2]})
    header, *raws = msgpack.unpackb(data)
    assert header["v"] == 1
    assert header["meta"] == {"k": [1, 2]}
    assert [t["name"] for t in header["tensors"]] == ["a", "b"]
    for entry, raw in zip(header["tensors"], raws, strict=True):
        want = tensors[entry["name"]]
        got = np.frombuffer(raw, np.dtype(entry["dtype"]).newbyteorder("<"))
        assert_same(got.reshape(entry["shape"]), want)


@pytest.mark.parametrize("sizes", [[0], [255, 256], [65535, 65536], [3] * 20])
def test_our_body_is_byte_identical_to_packb(sizes: list[int]) -> None:
    """Our hand-written framing is exactly what msgpack itself writes."""
    tensors = {f"t{i}": sample("uint8", (n,), seed=i) for i, n in enumerate(sizes)}
    meta = {"trace": "abc"}
    header = {"v": 1, "meta": meta,
              "tensors": [{"name": k, "dtype": "uint8", "shape": [v.size]}
                          for k, v in tensors.items()]}
    raws = [v.tobytes() for v in tensors.values()]
    assert encode(tensors, meta) == msgpack.packb([header, *raws])
