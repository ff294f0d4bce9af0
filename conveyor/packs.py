"""Several requests, or several replies, in one message (docs/wire.md, "Packs").

A *request pack* is a stage message (docs/wire.md section 6) with ``src`` ``"@client"``
and the AMQP ``type`` ``conveyor.pack``, published to the plan's input exchange: the
client SDK sends the requests that are ready in the same event-loop turn for the same
routing key as one message. The ingress unpacks it and treats each request as if it had
come alone (its own deadline, checks, batch slot and reply).

A *reply pack* (``type`` ``conveyor.replies``) answers several successful requests of one
client at once: an ok reply whose body ``meta`` lists the requests and the rows of the
output tensors each one owns. A worker sends one only to a client that said it reads
them (``RequestMeta.packed_replies``, header ``x-conveyor-replies: packed``); plain AMQP
clients that do not set it get one reply per request. Error replies always go one by one.

Both formats share the request entry of stage messages:
``{"id", "reply_to", "deadline", "attempt", "trace", "key", "rows"}`` (+ ``"packed": true``,
+ ``"sent"``: the client's send time). A stage message's meta also says ``"at"``: when it was
published (unix seconds), from which the next worker measures its wait in the broker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from conveyor import wire
from conveyor.envelope import CONTENT_TYPE, HEADER_STATUS, STATUS_OK, RequestMeta, plain_entry
from conveyor.errors import CodecError
from conveyor.transport import Message

#: AMQP ``type`` of a message carrying several requests (to the input exchange).
REQUEST_PACK_TYPE = "conveyor.pack"
#: AMQP ``type`` of an ok reply carrying the outputs of several requests.
REPLY_PACK_TYPE = "conveyor.replies"
#: ``src`` of a request pack (a stage message from outside the plan).
CLIENT_SOURCE = "@client"
STAGE_KIND = "stage"
REPLIES_KIND = "replies"


def request_entry(meta: RequestMeta, rows: int) -> dict[str, wire.MetaValue]:
    """The ``meta`` entry describing one request of a stage message or pack."""
    entry: dict[str, wire.MetaValue] = {
        "id": meta.request_id,
        "reply_to": meta.reply_to,
        "deadline": meta.deadline,
        "attempt": meta.attempt,
        "trace": meta.trace_id,
        "key": meta.key,
        "rows": rows,
    }
    if meta.packed_replies:
        entry["packed"] = True
    if meta.sent is not None:
        entry["sent"] = meta.sent
    return entry


def read_request_entries(raw: object, plan_hash: str) -> list[tuple[RequestMeta, int]]:
    """The ``requests`` list of a stage message or pack; ``CodecError`` if malformed."""
    if not isinstance(raw, list) or not raw:
        raise CodecError("stage message meta needs a non-empty 'requests' list")
    requests: list[tuple[RequestMeta, int]] = []
    plan_checked = False
    for entry in raw:
        if not isinstance(entry, dict):
            raise CodecError(f"stage message request entry is a {type(entry).__name__}")
        rows = _rows(entry.get("rows"))
        packed = entry.get("packed", False)
        if not isinstance(packed, bool):
            raise CodecError(f"stage message request 'packed' must be a bool, got {packed!r:.40}")
        rid, reply_to, deadline = entry.get("id"), entry.get("reply_to"), entry.get("deadline")
        attempt, trace, key = entry.get("attempt", 1), entry.get("trace"), entry.get("key")
        sent = entry.get("sent")
        if plan_checked and plain_entry(rid, reply_to, deadline, attempt, trace, key, sent):
            # The common case, without RequestMeta's per-field checks (same verdict).
            request = RequestMeta.trusted(
                rid, reply_to, deadline, plan_hash, packed, attempt, trace, key, sent  # type: ignore[arg-type]
            )
            requests.append((request, rows))
            continue
        try:
            request = RequestMeta(
                request_id=entry["id"],
                reply_to=entry.get("reply_to"),
                deadline=entry.get("deadline"),
                plan_hash=plan_hash,
                attempt=entry.get("attempt", 1),
                trace_id=entry.get("trace"),
                key=entry.get("key"),
                packed_replies=packed,
                sent=sent,
            )
        except KeyError as exc:
            raise CodecError("stage message request entry has no 'id'") from exc
        plan_checked = True  # the plan hash is the message's: one check covers all entries
        requests.append((request, rows))
    return requests


@dataclass(frozen=True)
class StageMessage:
    """A decoded stage message, request pack or plain request: its requests (meta, rows)
    and their stacked tensors. ``plan_hash`` is None for a plain request that names none."""

    plan_hash: str | None
    source: str
    requests: tuple[tuple[RequestMeta, int], ...]
    tensors: Mapping[str, np.ndarray]
    #: Unix time this message was published (meta ``"at"``; a plain request's ``sent``),
    #: None when the sender did not say: the time it waited in the broker's queue.
    at: float | None = None


def encode_stage_message(
    plan_hash: str,
    source: str,
    requests: Sequence[tuple[RequestMeta, int]],
    tensors: Mapping[str, np.ndarray],
    *,
    message_type: str | None = None,
) -> Message:
    """The message carrying ``requests`` (meta, rows) and their stacked ``tensors``; its
    AMQP envelope describes the first request (what broker tools show)."""
    meta: dict[str, wire.MetaValue] = {
        "kind": STAGE_KIND,
        "plan": plan_hash,
        "src": source,
        "requests": [request_entry(m, rows) for m, rows in requests],
        "at": time.time(),
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
    # The entries hold RequestMeta's checked fields: no need to walk them again.
    message = envelope.to_message(wire.encode(tensors, meta, check_meta=False))
    return message if message_type is None else replace(message, type=message_type)


def decode_stage_message(body: bytes) -> StageMessage:
    """Decode a stage message or request pack; ``CodecError`` naming what is malformed."""
    decoded = wire.decode(body)
    meta = decoded.meta
    if meta.get("kind") != STAGE_KIND:
        raise CodecError(f"not a stage message: meta kind is {meta.get('kind')!r}")
    plan, source = meta.get("plan"), meta.get("src")
    if not isinstance(plan, str) or not isinstance(source, str):
        raise CodecError("stage message meta needs str 'plan' and 'src'")
    requests = read_request_entries(meta.get("requests"), plan)
    _check_rows(decoded.tensors, sum(rows for _, rows in requests), "stage message")
    at = meta.get("at")
    sent = at if type(at) is float else None
    return StageMessage(plan, source, tuple(requests), decoded.tensors, sent)


def pack_requests(
    plan_hash: str, requests: Sequence[tuple[RequestMeta, Mapping[str, np.ndarray]]]
) -> Message:
    """One request pack holding ``requests`` (meta, inputs with a leading batch axis)."""
    names = list(requests[0][1])
    stacked = {n: np.concatenate([inputs[n] for _, inputs in requests]) for n in names}
    rows = [(meta, _rows(len(inputs[names[0]]) if names else 0)) for meta, inputs in requests]
    return encode_stage_message(
        plan_hash, CLIENT_SOURCE, rows, stacked, message_type=REQUEST_PACK_TYPE
    )


def read_requests(message: Message, *, ingress: bool) -> StageMessage:
    """The one step that reads a message a worker consumes into requests.

    ``ingress``: a message from the input exchange, a plain request (docs/wire.md sections
    1-2: envelope in the AMQP properties, one request) or a request pack (section 7).
    Otherwise a stage message (section 6) from another stage's worker. The tensors are
    read-only views into the body. ``CodecError`` naming what is malformed.
    """
    if not ingress or message.type == REQUEST_PACK_TYPE:
        return decode_stage_message(message.body)
    meta = RequestMeta.from_message(message)
    tensors = wire.decode(message.body).tensors
    rows = request_rows(tensors)
    return StageMessage(meta.plan_hash, CLIENT_SOURCE, ((meta, rows),), tensors, meta.sent)


def request_rows(tensors: Mapping[str, np.ndarray]) -> int:
    """Rows (batch dimension) of one request: every tensor but scalars must agree."""
    rows = {int(a.shape[0]) for a in tensors.values() if a.ndim > 0}
    if len(rows) > 1:
        raise CodecError(
            f"request tensors: inputs disagree on the batch dimension: {sorted(rows)}"
        )
    return rows.pop() if rows else 1


def unpack_requests(message: Message) -> list[tuple[RequestMeta, dict[str, np.ndarray]]]:
    """The requests a message to the input exchange carries (one, or a pack's), each with
    its tensors as read-only views into the body; ``CodecError`` if malformed."""
    read = read_requests(message, ingress=True)
    if read.source != CLIENT_SOURCE:
        raise CodecError(f"a request pack must say src {CLIENT_SOURCE!r}, not {read.source!r}")
    return list(zip((meta for meta, _ in read.requests), request_pieces(read), strict=True))


def request_pieces(msg: StageMessage) -> list[dict[str, np.ndarray]]:
    """Each request's own tensors: the whole message for one request (scalars included),
    else its rows of every tensor."""
    if len(msg.requests) == 1:
        return [dict(msg.tensors)]
    return split_rows(msg.tensors, [rows for _, rows in msg.requests])


def pack_replies(
    requests: Sequence[tuple[str, int]], tensors: Mapping[str, np.ndarray]
) -> Message:
    """One ok reply carrying ``tensors``, of which request ``i`` owns the next ``rows``."""
    meta: dict[str, wire.MetaValue] = {
        "kind": REPLIES_KIND,
        "requests": [{"id": rid, "rows": rows} for rid, rows in requests],
    }
    return Message(
        body=wire.encode(tensors, meta, check_meta=False),
        headers={HEADER_STATUS: STATUS_OK},
        content_type=CONTENT_TYPE,
        correlation_id=requests[0][0],
        type=REPLY_PACK_TYPE,
    )


def unpack_replies(message: Message) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(request id, its output tensors) for each request a reply pack answers; the arrays
    are read-only views into the body. ``CodecError`` if the pack is malformed."""
    decoded = wire.decode(message.body)
    meta = decoded.meta
    if meta.get("kind") != REPLIES_KIND:
        raise CodecError(f"not a reply pack: meta kind is {meta.get('kind')!r}")
    raw = meta.get("requests")
    if not isinstance(raw, list) or not raw:
        raise CodecError("reply pack meta needs a non-empty 'requests' list")
    entries: list[tuple[str, int]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise CodecError(f"reply pack request entry is a {type(entry).__name__}")
        request_id = entry.get("id")
        if not isinstance(request_id, str):
            raise CodecError("reply pack request entry needs a str 'id'")
        entries.append((request_id, _rows(entry.get("rows"))))
    _check_rows(decoded.tensors, sum(rows for _, rows in entries), "reply pack")
    pieces = split_rows(decoded.tensors, [rows for _, rows in entries])
    return [(rid, piece) for (rid, _), piece in zip(entries, pieces, strict=True)]


def split_rows(
    tensors: Mapping[str, np.ndarray], rows: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Request ``i``'s views of ``tensors``: the next ``rows[i]`` rows of each (the caller
    has checked that the rows add up)."""
    pieces = []
    start = 0
    for n in rows:
        end = start + n
        pieces.append({name: a[start:end] for name, a in tensors.items()})
        start = end
    return pieces


def _rows(rows: object) -> int:
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise CodecError(f"request rows must be an int >= 0, got {rows!r:.40}")
    return rows


def _check_rows(tensors: Mapping[str, np.ndarray], total: int, what: str) -> None:
    for name, array in tensors.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise CodecError(
                f"{what} tensor {name!r} has shape {list(array.shape)}; "
                f"its requests hold {total} rows"
            )
