"""Repeated headers take the codec's cached path: same results, same checks."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.errors import CodecError
from conveyor.wire import decode, encode


def test_repeated_signature_round_trips_each_message_s_own_values() -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.random((1, 5), dtype=np.float32) for _ in range(3)]
    bodies = [encode({"x": a}) for a in arrays]
    for a, body in zip(arrays, bodies, strict=True):
        np.testing.assert_array_equal(decode(body).tensors["x"], a)


def test_a_known_header_with_wrong_tensor_bytes_is_still_refused() -> None:
    good = encode({"x": np.zeros((2, 3), np.float32)})
    decode(good)  # now a known header
    with pytest.raises(CodecError, match=r"truncated|needs"):
        decode(good[:-4])
    with pytest.raises(CodecError, match="trailing"):
        decode(good + b"\x00")


def test_a_known_header_does_not_hide_meta_or_a_new_shape() -> None:
    decode(encode({"x": np.zeros((1, 3), np.float32)}))
    with_meta = decode(encode({"x": np.zeros((1, 3), np.float32)}, {"k": 1}))
    assert with_meta.meta == {"k": 1}
    other = decode(encode({"x": np.zeros((4, 3), np.float64)}))
    assert other.tensors["x"].shape == (4, 3) and other.tensors["x"].dtype == np.float64
    # The decoded meta of a meta-less message is the caller's own dict.
    first = decode(encode({"x": np.zeros((1, 3), np.float32)}))
    first.meta["mine"] = True
    assert decode(encode({"x": np.zeros((1, 3), np.float32)})).meta == {}
