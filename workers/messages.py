"""Messages between stages in different processes (docs/wire.md, "Between stages").

A stage message is an ordinary wire body whose ``meta`` describes the requests it holds:

    {"kind": "stage", "plan": <Plan.hash>, "src": <producing stage or "@input">,
     "requests": [{"id", "reply_to", "deadline", "attempt", "trace", "key", "rows"}, ...]}

Its tensors are the batch: request ``i`` owns the next ``rows`` rows of every tensor. The
AMQP envelope (``message_id``, ``x-conveyor-*`` headers) describes the first request, so
broker tools show something meaningful; workers read the ``meta``. Messages to a join
stage carry one request each (routed by consistent hash on its id).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from conveyor import wire
from conveyor.envelope import RequestMeta
from conveyor.errors import CodecError
from conveyor.transport import Message

KIND = "stage"


@dataclass(frozen=True)
class StageMessage:
    plan_hash: str
    source: str
    requests: tuple[tuple[RequestMeta, int], ...]
    tensors: Mapping[str, np.ndarray]


def _request_meta(meta: RequestMeta, rows: int) -> dict[str, wire.MetaValue]:
    return {
        "id": meta.request_id,
        "reply_to": meta.reply_to,
        "deadline": meta.deadline,
        "attempt": meta.attempt,
        "trace": meta.trace_id,
        "key": meta.key,
        "rows": rows,
    }


def encode_stage_message(
    plan_hash: str,
    source: str,
    requests: Sequence[tuple[RequestMeta, int]],
    tensors: Mapping[str, np.ndarray],
) -> Message:
    meta: dict[str, wire.MetaValue] = {
        "kind": KIND,
        "plan": plan_hash,
        "src": source,
        "requests": [_request_meta(m, rows) for m, rows in requests],
    }
    first = requests[0][0]
    envelope = RequestMeta(
        request_id=first.request_id,
        reply_to=first.reply_to,
        deadline=first.deadline,
        plan_hash=plan_hash,
        attempt=first.attempt,
        trace_id=first.trace_id,
        key=first.key,
    )
    return envelope.to_message(wire.encode(tensors, meta))


def decode_stage_message(body: bytes) -> StageMessage:
    """Decode a stage message; ``CodecError`` naming what is malformed."""
    decoded = wire.decode(body)
    meta = decoded.meta
    if meta.get("kind") != KIND:
        raise CodecError(f"not a stage message: meta kind is {meta.get('kind')!r}")
    plan, source, raw = meta.get("plan"), meta.get("src"), meta.get("requests")
    if not isinstance(plan, str) or not isinstance(source, str):
        raise CodecError("stage message meta needs str 'plan' and 'src'")
    if not isinstance(raw, list) or not raw:
        raise CodecError("stage message meta needs a non-empty 'requests' list")
    requests: list[tuple[RequestMeta, int]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise CodecError(f"stage message request entry is a {type(entry).__name__}")
        rows = entry.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise CodecError(f"stage message request rows must be an int >= 0, got {rows!r}")
        try:
            request = RequestMeta(
                request_id=entry["id"],  # type: ignore[arg-type]
                reply_to=entry.get("reply_to"),  # type: ignore[arg-type]
                deadline=entry.get("deadline"),  # type: ignore[arg-type]
                plan_hash=plan,
                attempt=entry.get("attempt", 1),  # type: ignore[arg-type]
                trace_id=entry.get("trace"),  # type: ignore[arg-type]
                key=entry.get("key"),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise CodecError("stage message request entry has no 'id'") from exc
        requests.append((request, rows))
    total = sum(rows for _, rows in requests)
    for name, array in decoded.tensors.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise CodecError(
                f"stage message tensor {name!r} has shape {list(array.shape)}; "
                f"its requests hold {total} rows"
            )
    return StageMessage(plan, source, tuple(requests), decoded.tensors)
