"""A plain AMQP client (pika, no Conveyor code on its side) talks to the workers.

The request is built exactly as docs/wire.md describes it: a msgpack array
``[{"v": 1, "meta": {}, "tensors": [{"name", "dtype", "shape"}]}, raw bytes...]``,
``message_id``/``correlation_id`` = the request id, ``reply_to`` = our queue, and the
``x-conveyor-*`` headers; it goes to ``conveyor.<plan short hash>.input``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest

from conveyor.app.demo import relative_error
from conveyor.topology import Topology
from tests.support.brokers import BrokerHandle
from tests.support.cases import Case
from tests.support.pipeline import Pipeline

pytestmark = pytest.mark.rabbitmq


@dataclass
class PlainReply:
    headers: dict[str, Any]
    correlation_id: str | None
    body: bytes


def pika_request(url: str, exchange: str, body: bytes, headers: dict[str, Any],
                 timeout: float = 30.0) -> tuple[str, PlainReply]:
    """docs/wire.md section 4, step by step: publish with pika, wait for our reply."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare(queue="", exclusive=True).method.queue
        request_id = uuid.uuid4().hex
        channel.basic_publish(
            exchange=exchange,
            routing_key="",
            body=body,
            properties=pika.BasicProperties(
                content_type="application/msgpack",
                message_id=request_id,
                correlation_id=request_id,
                reply_to=reply_queue,
                headers=headers,
            ),
            mandatory=True,
        )
        for method, props, reply_body in channel.consume(
            reply_queue, auto_ack=True, inactivity_timeout=timeout
        ):
            assert method is not None, f"no reply within {timeout} s"
            if props.correlation_id == request_id:
                channel.cancel()
                return request_id, PlainReply(dict(props.headers or {}), props.correlation_id,
                                              reply_body)
        raise AssertionError("the consume generator ended without a reply")
    finally:
        connection.close()


def plain_body(tensors: dict[str, np.ndarray]) -> bytes:
    """docs/wire.md's layout, written with msgpack alone."""
    header = {
        "v": 1,
        "meta": {},
        "tensors": [
            {"name": name, "dtype": a.dtype.name, "shape": list(a.shape)}
            for name, a in tensors.items()
        ],
    }
    bins = [np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
            for a in tensors.values()]
    return msgpack.packb([header, *bins])


def plain_decode(body: bytes) -> dict[str, np.ndarray]:
    header, *bins = msgpack.unpackb(body, raw=False)
    return {
        t["name"]: np.frombuffer(b, dtype=np.dtype(t["dtype"]).newbyteorder("<")).reshape(
            t["shape"]
        )
        for t, b in zip(header["tensors"], bins, strict=True)
    }


async def test_plain_client_request_gets_the_right_answer(
    rabbitmq_url: str, tmp_path: Any, mlp: Case
) -> None:
    import asyncio

    request = mlp.requests(1, seed=5)[0]
    async with Pipeline(BrokerHandle("rabbitmq", rabbitmq_url), tmp_path).serve(mlp) as served:
        headers = {
            # pika has no float header type: a decimal string keeps the fraction.
            "x-conveyor-deadline": f"{time.time() + 30.0:.3f}",
            "x-conveyor-plan": served.plan.hash,
            "x-conveyor-attempt": 1,
        }
        request_id, reply = await asyncio.to_thread(
            pika_request, rabbitmq_url, Topology.of(served.plan).input_exchange,
            plain_body(request), headers,
        )
    assert reply.correlation_id == request_id
    assert reply.headers.get("x-conveyor-status") in ("ok", b"ok")
    got = plain_decode(reply.body)
    want = mlp.reference(request)
    assert sorted(got) == sorted(want)
    for name in want:
        assert relative_error(got[name], want[name]) <= 1e-5


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"\xc1 this is not msgpack", "garbage"),
        (None, "wrong shape"),  # valid msgpack, tensor of the wrong shape
    ],
)
async def test_plain_client_malformed_request_gets_codec_error_and_is_dead_lettered(
    rabbitmq_url: str, tmp_path: Any, mlp: Case, body: bytes | None, why: str
) -> None:
    import asyncio

    from tests.e2e.test_faults import dead_letters
    from workers.amqp import AmqpTransport

    if body is None:
        name = mlp.plan.inputs[0].name
        body = plain_body({name: np.zeros((1, 783), np.float32)})
    async with Pipeline(BrokerHandle("rabbitmq", rabbitmq_url), tmp_path).serve(mlp) as served:
        headers = {"x-conveyor-plan": served.plan.hash, "x-conveyor-attempt": 1}
        request_id, reply = await asyncio.to_thread(
            pika_request, rabbitmq_url, Topology.of(served.plan).input_exchange, body, headers
        )
        assert reply.correlation_id == request_id
        assert reply.headers.get("x-conveyor-status") in ("error", b"error")
        error = msgpack.unpackb(reply.body, raw=False)
        assert error["code"] == "codec_error", (why, error)
        assert error["message"], why
        admin = await AmqpTransport.connect(rabbitmq_url)
        try:
            assert await dead_letters(admin, served.plan, at_least=1) == 1
        finally:
            await admin.close(grace=0.5)
        # The workers go on serving.
        request = mlp.requests(1)[0]
        mlp.check(request, await served.client.infer(request))
