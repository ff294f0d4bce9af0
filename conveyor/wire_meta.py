"""The check that a body's ``meta`` is a tree of the wire's value types with str keys.

``conveyor.wire.encode`` runs it on every meta it did not build itself; the fast path
checks a container at a time, the slow one names the bad value's path.
"""

from __future__ import annotations

from collections.abc import Mapping

from conveyor.errors import CodecError

_META_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
_STR_KEYS = frozenset({str})


def check_meta(meta: Mapping[str, object]) -> None:
    """Check ``meta`` is a MetaValue tree with str keys (iteratively: depth is unbounded)."""
    if not meta or _plain_meta(meta):
        return
    _explain_meta(meta)


def _plain_meta(meta: object) -> bool:
    """True when ``meta`` is built of exactly the MetaValue types with str keys: the common
    case, checked a container at a time (the type sets are built in C) without any path
    text. False sends it to ``_explain_meta``, which accepts subclasses too and names
    what is wrong."""
    scalars = _META_SCALARS
    stack = [meta]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            if not _STR_KEYS.issuperset(map(type, value)):  # type: ignore[call-overload]
                return False
            items = value.values()  # type: ignore[attr-defined]
        elif kind is list or kind is tuple:
            items = value
        elif kind in scalars:
            continue
        else:
            return False
        if not scalars.issuperset(map(type, items)):
            stack.extend(item for item in items if type(item) not in scalars)
    return True


def _explain_meta(meta: Mapping[str, object]) -> None:
    """The slow walk of ``_check_meta``: raises ``CodecError`` naming the bad value's path."""
    stack: list[tuple[object, str]] = [(meta, "meta")]
    while stack:
        value, path = stack.pop()
        if value is None or isinstance(value, bool | int | float | str | bytes):
            continue
        if isinstance(value, list | tuple):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise CodecError(f"{path} has a {type(key).__name__} key {key!r:.40}; "
                                     f"meta keys are str")
                stack.append((item, f"{path}[{key!r:.40}]"))
        else:
            raise CodecError(f"{path} is a {type(value).__name__}; meta values are None, "
                             f"bool, int, float, str, bytes, lists and str-keyed maps")
