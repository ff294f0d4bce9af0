"""The tensor wire codec: named numpy tensors plus small metadata <-> one msgpack body.

docs/wire.md is the spec. In short, a body is the msgpack array ``[header, bin_0, ...]``:

* ``header`` is the map ``{"v": 1, "meta": {...}, "tensors": [{"name", "dtype", "shape"}]}``
  (dtype: a numpy name from ``conveyor.plan.ALLOWED_DTYPES``; shape: a list of ints);
* ``bin_i`` is tensor ``i``'s raw C-order little-endian bytes as a msgpack ``bin``.

Any msgpack library reads and writes it. Ours:

* ``encode`` copies each tensor's bytes once: it writes the msgpack framing itself and
  joins it with the arrays' buffers (big-endian or non-contiguous inputs are converted
  first, which costs one more copy of that tensor);
* ``decode`` validates the whole layout (sizes, dtypes, shapes, names, limits) before it
  allocates anything, then returns read-only ``np.frombuffer`` views into the body: no
  tensor byte is copied. A view keeps the body alive; copy it (``arr.copy()``) to keep a
  tensor without keeping the whole body, or to write to it.

Every problem with a body raises ``CodecError`` naming what is wrong; no other exception
leaves ``decode``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack
import numpy as np

from conveyor.errors import CodecError, ConfigError
from conveyor.plan import ALLOWED_DTYPES, TensorSpec
from conveyor.wire_meta import check_meta as _check_meta

MetaValue: TypeAlias = (
    bool | int | float | str | bytes | list["MetaValue"] | dict[str, "MetaValue"] | None
)

#: The ``"v"`` of the header this module writes and reads.
WIRE_VERSION = 1

_HEADER_KEYS = frozenset({"v", "meta", "tensors"})
_TENSOR_KEYS = frozenset({"name", "dtype", "shape"})
#: The wire dtype of each allowed name: explicitly little-endian.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES
}
#: Allowed dtype -> its name, native and both byte orders (``dtype.name`` is slow).
_NAME_OF: dict[np.dtype[Any], str] = {
    dt: name
    for name in ALLOWED_DTYPES
    for dt in (np.dtype(name), np.dtype(name).newbyteorder("<"), np.dtype(name).newbyteorder(">"))
}
_BYTES_LIKE = (bytes, bytearray, memoryview)
#: The header is read from a prefix this long first; a longer header gets a second try.
_FIRST_READ = 4096
_BIN32_MAX = 2**32 - 1
#: Headers without meta (requests, replies) repeat message after message: the encoder
#: keeps the packed header per (name, dtype, shape) signature (cleared when full) and the
#: decoder the parsed tensor lists of the last few headers; both for the default limits.
_CACHE_SIZE = 64
_encoded_headers: dict[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], bytes] = {}
#: (header bytes, parsed tensor list) of the last few meta-less headers decoded.
_decoded_headers: list[tuple[bytes, list[tuple[str, np.dtype[Any], tuple[int, ...]]]]] = []
_DECODED_KEPT = 4


@dataclass(frozen=True)
class Limits:
    """Bounds a decoder enforces (and an encoder respects) before allocating anything."""

    max_message_bytes: int = 512 * 2**20
    max_tensors: int = 256
    max_dims: int = 16
    max_name_bytes: int = 256
    max_meta_bytes: int = 1 * 2**20

    def __post_init__(self) -> None:
        for field_name in (
            "max_message_bytes", "max_tensors", "max_dims", "max_name_bytes", "max_meta_bytes"
        ):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Limits.{field_name} must be a positive int, got {value!r}")

    @property
    def max_header_bytes(self) -> int:
        """The most bytes a header within these limits can take (meta + tensor entries)."""
        per_tensor = self.max_name_bytes + 9 * self.max_dims + 64
        return self.max_meta_bytes + self.max_tensors * per_tensor + 64


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Decoded:
    #: Read-only zero-copy views into the body, in message order.
    tensors: dict[str, np.ndarray]
    meta: dict[str, MetaValue]


# -- encode ----------------------------------------------------------------------------------


def encode(
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, MetaValue] | None = None,
    limits: Limits = DEFAULT_LIMITS,
    *,
    check_meta: bool = True,
) -> bytes:
    """Build a body holding ``tensors`` (in mapping order) and ``meta``.

    ``check_meta=False`` skips the walk over ``meta`` that rejects values outside the
    MetaValue types and non-str keys: for a meta built by Conveyor itself from checked
    fields (packs, stage messages). Its size limit still applies.

    Raises ``CodecError`` for a dtype outside the allow-list, a name or meta that is not
    a string-keyed msgpack value, or a message beyond ``limits``.
    """
    signature = _signature(tensors) if not meta and limits is DEFAULT_LIMITS else None
    if signature is not None:
        cached = _encoded_headers.get(signature)
        if cached is not None:
            # Same names, dtypes and shapes as a message already checked against these
            # limits: only the arrays' bytes differ.
            return _join(_array_header(len(tensors) + 1), cached, list(tensors.values()))
    arrays, header = _header(tensors, meta, limits, check_meta)
    array_header = _array_header(len(arrays) + 1)
    _check_sizes(tensors, arrays, len(array_header) + len(header), limits)
    if signature is not None:
        if len(_encoded_headers) >= _CACHE_SIZE:
            _encoded_headers.clear()
        _encoded_headers[signature] = header
    return _join(array_header, header, arrays)


def _header(
    tensors: Mapping[str, np.ndarray],
    meta: Mapping[str, MetaValue] | None,
    limits: Limits,
    check_meta: bool,
) -> tuple[list[np.ndarray], bytes]:
    """The checked arrays and the packed header (version, meta, tensor entries)."""
    if len(tensors) > limits.max_tensors:
        raise CodecError(f"{len(tensors)} tensors; the limit is {limits.max_tensors}")
    arrays: list[np.ndarray] = []
    entries: list[dict[str, Any]] = []
    for name, value in tensors.items():
        _check_name(name, limits, where=None)
        array, dtype_name = _checked_array(name, value, limits)
        arrays.append(array)
        entries.append({"name": name, "dtype": dtype_name, "shape": list(array.shape)})
    meta_dict: dict[str, Any] = {} if meta is None else dict(meta)
    if check_meta:
        _check_meta(meta_dict)
    meta_bytes = _pack(meta_dict, "meta")
    if len(meta_bytes) > limits.max_meta_bytes:
        raise CodecError(f"meta packs to {len(meta_bytes)} bytes; the limit is "
                         f"{limits.max_meta_bytes}")
    # {"v": 1, "meta": ..., "tensors": [...]} written key by key so meta is packed once.
    header = b"\x83\xa1v\x01\xa4meta" + meta_bytes + b"\xa7tensors" + _pack(entries, "header")
    return arrays, header


def _check_sizes(
    tensors: Mapping[str, np.ndarray], arrays: list[np.ndarray], head: int, limits: Limits
) -> None:
    """``CodecError`` for a tensor too large for a msgpack bin or a message over the limit."""
    total = head
    for name, array in zip(tensors, arrays, strict=True):
        if array.nbytes > _BIN32_MAX:
            raise CodecError(f"tensor {name!r} is {array.nbytes} bytes; a msgpack bin holds "
                             f"at most {_BIN32_MAX}")
        total += len(_bin_header(array.nbytes)) + array.nbytes
    if total > limits.max_message_bytes:
        raise CodecError(f"message would be {total} bytes; the limit is "
                         f"{limits.max_message_bytes}")


def _join(array_header: bytes, header: bytes, arrays: list[np.ndarray]) -> bytes:
    """The body; everything is checked, so only now convert arrays that are not
    wire-ready. The one copy of each tensor's bytes: join reads every buffer directly."""
    parts: list[bytes | memoryview] = [array_header, header]
    for array in arrays:
        parts.append(_bin_header(array.nbytes))
        parts.append(_little_endian_c_order(array).data)
    return b"".join(parts)


def _signature(
    tensors: Mapping[str, np.ndarray],
) -> tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...] | None:
    """The (name, dtype, shape) of each tensor; None unless all are plain numpy arrays."""
    if len(tensors) > 8:
        return None
    signature = []
    for name, value in tensors.items():
        if type(value) is not np.ndarray or type(name) is not str:
            return None
        signature.append((name, value.dtype, value.shape))
    return tuple(signature)


def _checked_array(name: str, value: object, limits: Limits) -> tuple[np.ndarray, str]:
    """``value`` as an array with an allowed dtype and rank, and its dtype name."""
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise CodecError(f"tensor {name!r} is a {type(value).__name__}, not a numpy array")
    dtype_name = _NAME_OF.get(value.dtype)
    if dtype_name is None:
        raise CodecError(f"tensor {name!r} has dtype {value.dtype!s}; allowed: "
                         f"{', '.join(sorted(ALLOWED_DTYPES))}")
    if value.ndim > limits.max_dims:
        raise CodecError(f"tensor {name!r} has {value.ndim} dimensions; the limit is "
                         f"{limits.max_dims}")
    return value, dtype_name


def _little_endian_c_order(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is wire-ready, else a converted copy."""
    order = array.dtype.byteorder
    if order == ">" or (order == "=" and sys.byteorder == "big"):
        return array.astype(array.dtype.newbyteorder("<"), order="C")
    if not array.flags.c_contiguous:
        return np.ascontiguousarray(array)
    return array


def _pack(value: object, what: str) -> bytes:
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"{what} cannot be packed as msgpack: {exc}") from exc
    return packed


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 2**16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 2**16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


# -- decode ----------------------------------------------------------------------------------


def decode(body: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Decoded:
    """Validate ``body`` and return read-only zero-copy views of its tensors.

    Raises ``CodecError`` naming what is wrong, and nothing else.
    """
    try:
        return _decode(body, limits)
    except CodecError:
        raise
    except (
        msgpack.UnpackException,
        ValueError,
        TypeError,
        OverflowError,
        KeyError,
        IndexError,
        BufferError,
        MemoryError,
        RecursionError,
    ) as exc:
        # msgpack's own errors and anything a malformed body provokes below: translated here.
        raise CodecError(f"malformed message: {type(exc).__name__}: {exc}") from exc


def _decode(body: bytes | bytearray | memoryview, limits: Limits) -> Decoded:
    view = _byte_view(body)
    size = view.nbytes
    if size > limits.max_message_bytes:
        raise CodecError(f"message is {size} bytes; the limit is {limits.max_message_bytes}")
    count, pos = _read_len(view, 0, _ARRAY_HEADS, None)
    if count < 1:
        raise CodecError("message is an empty array; expected [header, tensor bytes...]")
    if count - 1 > limits.max_tensors:
        raise CodecError(f"message declares {count - 1} tensors; the limit is "
                         f"{limits.max_tensors}")
    start = pos
    known = _known_header(view, pos, count - 1) if limits is DEFAULT_LIMITS else None
    if known is not None:
        meta: dict[str, MetaValue] = {}
        pos += known[0]
        entries = known[1]
    else:
        header, pos = _unpack_header(view, pos, limits)
        meta, entries = _parse_header(header, count - 1, pos - start, limits)
        if not meta and limits is DEFAULT_LIMITS:
            _decoded_headers.insert(0, (bytes(view[start:pos]), entries))
            del _decoded_headers[_DECODED_KEPT:]
    # (name, dtype, shape, element count, offset): all validated before any view is made.
    layouts: list[tuple[str, np.dtype[Any], tuple[int, ...], int, int]] = []
    for index, (name, dtype, shape) in enumerate(entries):
        length, pos = _read_len(view, pos, _BIN_HEADS, (index, name))
        elements = math.prod(shape)
        expected = elements * dtype.itemsize
        if length != expected:
            raise CodecError(
                f"tensor {name!r}: {dtype.name}{list(shape)} needs {expected} bytes, "
                f"its bin holds {length}"
            )
        if pos + length > size:
            raise CodecError(f"tensor {name!r}: message truncated: its {length} bytes start at "
                             f"offset {pos} but the message ends at {size}")
        layouts.append((name, dtype, shape, elements, pos))
        pos += length
    if pos != size:
        raise CodecError(f"{size - pos} bytes of trailing garbage after the last tensor "
                         f"(offset {pos})")
    source = view if isinstance(body, memoryview) else body
    tensors: dict[str, np.ndarray] = {}
    for name, dtype, shape, elements, offset in layouts:
        array = np.frombuffer(source, dtype=dtype, count=elements, offset=offset).reshape(shape)
        array.flags.writeable = False
        tensors[name] = array
    return Decoded(tensors=tensors, meta=meta)


def _known_header(
    view: memoryview, pos: int, n_bins: int
) -> tuple[int, list[tuple[str, np.dtype[Any], tuple[int, ...]]]] | None:
    """(length, parsed tensor list) when the header at ``pos`` is one decoded lately (a
    msgpack object is prefix-free: the same bytes there are that same header)."""
    for raw, entries in _decoded_headers:
        if view[pos : pos + len(raw)] == raw and len(entries) == n_bins:
            return len(raw), entries
    return None


def _byte_view(body: object) -> memoryview:
    if not isinstance(body, _BYTES_LIKE):
        raise CodecError(f"message body must be bytes, bytearray or memoryview, "
                         f"got {type(body).__name__}")
    view = memoryview(body)
    if not view.c_contiguous:
        raise CodecError("message body is a non-contiguous memoryview")
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    return view


# first byte -> width of the big-endian length after it (-1: length in the low 4 bits)
_ARRAY_HEADS: dict[int, int] = {0xDC: 2, 0xDD: 4, **{b: -1 for b in range(0x90, 0xA0)}}
_BIN_HEADS: dict[int, int] = {0xC4: 1, 0xC5: 2, 0xC6: 4}


def _read_len(
    view: memoryview, pos: int, heads: dict[int, int], tensor: tuple[int, str] | None
) -> tuple[int, int]:
    """Read the outer array header (``tensor`` None) or a tensor's bin header at ``pos``.

    Returns (declared length, position after the header).
    """
    if pos < view.nbytes and (width := heads.get(view[pos])) is not None:
        if width < 0:
            return view[pos] & 0x0F, pos + 1
        end = pos + 1 + width
        if end <= view.nbytes:
            return int.from_bytes(view[pos + 1 : end], "big"), end
    # Not the header expected: say why (formatting only on this path).
    what = ("the message (a msgpack array)" if tensor is None
            else f"tensor {tensor[0]} ({tensor[1]!r}), a bin,")
    if pos >= view.nbytes:
        raise CodecError(f"message truncated: expected {what} at offset {pos}, "
                         f"the message ends there")
    first = view[pos]
    if first not in heads:
        raise CodecError(f"expected {what} at offset {pos}, found msgpack byte 0x{first:02x}")
    raise CodecError(f"message truncated inside the header of {what} at offset {pos}")


def _unpack_header(view: memoryview, pos: int, limits: Limits) -> tuple[object, int]:
    """Unpack the header map with a fresh, bounded unpacker per try; (header, next pos)."""
    cap = limits.max_header_bytes
    end = min(view.nbytes, pos + cap)
    stops = (pos + _FIRST_READ, end) if pos + _FIRST_READ < end else (end,)
    for stop in stops:
        unpacker = msgpack.Unpacker(
            None,
            # read_size is the buffer allocated up front: only what this try feeds.
            read_size=max(stop - pos, 1),
            max_buffer_size=max(cap, stop - pos, 1),
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=limits.max_meta_bytes,
            max_bin_len=limits.max_meta_bytes,
            max_array_len=cap,
            max_map_len=cap,
            max_ext_len=0,
        )
        unpacker.feed(view[pos:stop])
        try:
            header = unpacker.unpack()
        except msgpack.OutOfData:
            continue
        return header, pos + unpacker.tell()
    if end == view.nbytes:
        raise CodecError(f"message truncated inside its header (offset {pos} onwards)")
    raise CodecError(f"message header is longer than the {cap} bytes the limits allow")


def _parse_header(
    header: object, n_bins: int, header_bytes: int, limits: Limits
) -> tuple[dict[str, MetaValue], list[tuple[str, np.dtype[Any], tuple[int, ...]]]]:
    if not isinstance(header, dict):
        raise CodecError(f"message header is a {type(header).__name__}; expected a map")
    if not _HEADER_KEYS.issuperset(header):
        unknown = set(header) - _HEADER_KEYS
        raise CodecError(f"message header has unknown keys {sorted(map(str, unknown))}; "
                         f"allowed: {sorted(_HEADER_KEYS)}")
    version = header.get("v")
    if isinstance(version, bool) or version != WIRE_VERSION:
        raise CodecError(f"wire format version {version!r}; this decoder reads {WIRE_VERSION}")
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CodecError(f"header 'meta' is a {type(meta).__name__}; expected a map")
    if header_bytes > limits.max_meta_bytes:
        # Only a header this large can hold too much meta; measure it exactly.
        meta_size = len(_pack(meta, "meta"))
        if meta_size > limits.max_meta_bytes:
            raise CodecError(f"meta is {meta_size} bytes; the limit is {limits.max_meta_bytes}")
    _check_meta(meta)
    listed = header.get("tensors", [])
    if not isinstance(listed, list):
        raise CodecError(f"header 'tensors' is a {type(listed).__name__}; expected an array")
    if len(listed) != n_bins:
        raise CodecError(f"header lists {len(listed)} tensors but the message carries "
                         f"{n_bins} tensor bins")
    entries = []
    seen: set[str] = set()
    for index, entry in enumerate(listed):
        name, dtype, shape = _parse_entry(index, entry, limits)
        if name in seen:
            raise CodecError(f"tensor name {name!r} appears more than once")
        seen.add(name)
        entries.append((name, dtype, shape))
    return meta, entries


def _parse_entry(
    index: int, entry: object, limits: Limits
) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not isinstance(entry, dict):
        raise CodecError(f"tensor entry {index} is a {type(entry).__name__}; expected a map")
    if entry.keys() != _TENSOR_KEYS:
        raise CodecError(f"tensor entry {index} has keys {sorted(map(str, entry))}; "
                         f"expected {sorted(_TENSOR_KEYS)}")
    name = entry["name"]
    _check_name(name, limits, where=index)
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in _WIRE_DTYPES:
        raise CodecError(f"tensor {name!r}: dtype {dtype_name!r} is not allowed; allowed: "
                         f"{', '.join(sorted(ALLOWED_DTYPES))}")
    shape = entry["shape"]
    if not isinstance(shape, list):
        raise CodecError(f"tensor {name!r}: shape is a {type(shape).__name__}; "
                         f"expected an array of ints")
    if len(shape) > limits.max_dims:
        raise CodecError(f"tensor {name!r}: {len(shape)} dimensions; the limit is "
                         f"{limits.max_dims}")
    for axis, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise CodecError(f"tensor {name!r}: dimension {axis} is {dim!r}; expected an int "
                             f">= 0")
    return name, _WIRE_DTYPES[dtype_name], tuple(shape)


def _check_name(name: object, limits: Limits, *, where: int | None) -> None:
    """``where``: the entry's index in a header being decoded, None when encoding."""
    if isinstance(name, str):
        size = len(name.encode("utf-8", "surrogatepass"))
        if 1 <= size <= limits.max_name_bytes:
            return
        problem = f"is {size} bytes; names take 1 to {limits.max_name_bytes}"
    else:
        problem = f"is a {type(name).__name__}, not a str"
    prefix = "encode" if where is None else f"tensor entry {where}"
    raise CodecError(f"{prefix}: tensor name {name!r:.80} {problem}")


# -- plan checks -----------------------------------------------------------------------------


def check_tensor(name: str, array: np.ndarray, spec: TensorSpec) -> None:
    """Check ``array`` against the plan's ``spec``: same dtype, rank and fixed dimensions.

    Symbolic dimensions (str, e.g. the batch dimension) and negative ones match any size.
    """
    if array.dtype.name != spec.dtype:
        raise CodecError(f"tensor {name!r}: dtype {array.dtype.name}, the plan expects "
                         f"{spec.dtype}")
    if array.ndim != len(spec.shape):
        raise CodecError(f"tensor {name!r}: shape {list(array.shape)} has {array.ndim} "
                         f"dimensions, the plan expects {len(spec.shape)} ({list(spec.shape)})")
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if isinstance(want, int) and want >= 0 and got != want:
            raise CodecError(f"tensor {name!r}: dimension {axis} is {got}, the plan expects "
                             f"{want} (plan shape {list(spec.shape)}, got {list(array.shape)})")
