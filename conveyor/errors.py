"""Conveyor's one exception tree.

Every error Conveyor raises on purpose is a ``ConveyorError``. Third-party errors
(aio-pika, onnxruntime, msgpack, tf2onnx) are translated once, at the boundary where
they enter our code, with ``raise ... from exc``, so callers catch ours only.

    ConveyorError
    ├── ConfigError                  bad settings, arguments or URLs
    ├── PlanError                    a plan directory that is missing, invalid or inconsistent
    │   └── PlanHashMismatch         a message names a plan other than the one loaded
    ├── ConversionError              the converter cannot export or split a model
    │   ├── ModelLoadError           the file is not a model we can read
    │   ├── UnsupportedModelError    opset too new, no batch dimension, unknown format
    │   └── SplitError               K too large, a group regex matching nothing, ...
    ├── CodecError                   a message body or tensor that fails validation
    │   └── RequestTooLarge          more rows or bytes than the plan's limits allow
    ├── TransportError               the broker side
    │   ├── BrokerUnreachable        the first connect failed
    │   ├── TransportClosed          used after close (an orderly state, not a fault)
    │   ├── ChannelBroken            the channel or connection died under an operation
    │   ├── NotFound                 the queue or exchange an operation names does not exist
    │   ├── UnroutableError          a mandatory publish that reached no queue
    │   ├── BackpressureError        a queue is full (reject-publish) or the publish was nacked
    │   └── NoConsumerError          no worker consumes the queue a request would wait in
    ├── InferenceError               a stage failed to run a request (carries the worker's text)
    │   └── CrashLoopError           its worker died at each of its deliveries; dead-lettered
    ├── DeadlineExceeded             a request's deadline passed before it was answered
    └── RemoteError                  an error reply from a worker of a type we do not know

Every exception carries a formatted message naming the cause; some carry fields
(``queue``, ``stage``, ``request_id``) for programmatic use.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Root of every error Conveyor raises on purpose."""

    #: A short stable name used on the wire in error replies (see docs/wire.md).
    code: str = "conveyor_error"


class ConfigError(ConveyorError):
    code = "config_error"


class PlanError(ConveyorError):
    code = "plan_error"


class PlanHashMismatch(PlanError):
    code = "plan_hash_mismatch"

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"message names plan {got!r} but this worker serves plan {expected!r}")
        self.expected = expected
        self.got = got


class ConversionError(ConveyorError):
    code = "conversion_error"


class ModelLoadError(ConversionError):
    code = "model_load_error"


class UnsupportedModelError(ConversionError):
    code = "unsupported_model"


class SplitError(ConversionError):
    code = "split_error"


class CodecError(ConveyorError):
    code = "codec_error"


class RequestTooLarge(CodecError):
    """A request carries more rows or bytes than the plan's ``limits`` allow."""

    code = "request_too_large"


class TransportError(ConveyorError):
    code = "transport_error"


class BrokerUnreachable(TransportError):
    code = "broker_unreachable"


class TransportClosed(TransportError):
    code = "transport_closed"


class ChannelBroken(TransportError):
    code = "channel_broken"


class NotFound(TransportError):
    """The broker has no queue or exchange of the name an operation gave (``NOT_FOUND``)."""

    code = "not_found"


class UnroutableError(TransportError):
    code = "unroutable"

    def __init__(self, exchange: str, routing_key: str) -> None:
        super().__init__(
            f"message to exchange {exchange!r} with routing key {routing_key!r} reached no queue"
        )
        self.exchange = exchange
        self.routing_key = routing_key


class BackpressureError(TransportError):
    code = "backpressure"

    def __init__(self, message: str, *, queue: str | None = None) -> None:
        super().__init__(message)
        self.queue = queue


class NoConsumerError(TransportError):
    """Nothing consumes a plan's input queue(s): a request would only wait for its timeout."""

    code = "no_consumer"


class InferenceError(ConveyorError):
    code = "inference_error"

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


class CrashLoopError(InferenceError):
    """A message whose worker died at each delivery, dead-lettered at the delivery limit."""

    code = "crash_loop"


class DeadlineExceeded(ConveyorError):
    code = "deadline_exceeded"
    #: Set by the client: True when the broker had confirmed the request (it may have
    #: run), False when it never had; None when unknown (an error reply from a worker).
    confirmed: bool | None = None


class RemoteError(ConveyorError):
    code = "remote_error"


#: Error codes that travel in error replies, mapped back to their classes by the client.
#: The one map of codes: a code of a class not listed here (``unroutable``,
#: ``plan_hash_mismatch``) is rebuilt as its nearest listed ancestor.
ERROR_CODES: dict[str, type[ConveyorError]] = {
    cls.code: cls
    for cls in (
        ConveyorError,
        ConfigError,
        PlanError,
        ConversionError,
        CodecError,
        RequestTooLarge,
        TransportError,
        BackpressureError,
        InferenceError,
        CrashLoopError,
        DeadlineExceeded,
        RemoteError,
    )
}


def error_from_code(code: str, message: str) -> ConveyorError:
    """Rebuild an error received in a reply; a code of an unlisted subclass becomes its
    nearest listed ancestor, an unknown code ``RemoteError``."""
    cls = ERROR_CODES.get(code) or _listed_ancestor(code)
    if cls is BackpressureError:
        return BackpressureError(message)
    if issubclass(cls, InferenceError):
        return cls(message)
    return cls(message)


def _listed_ancestor(code: str) -> type[ConveyorError]:
    todo: list[type[ConveyorError]] = [ConveyorError]
    while todo:
        cls = todo.pop()
        if cls.code == code:
            return next(a for a in cls.__mro__ if getattr(a, "code", None) in ERROR_CODES)
        todo.extend(cls.__subclasses__())
    return RemoteError
