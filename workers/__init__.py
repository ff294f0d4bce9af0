"""Stage workers: run a plan's stages with onnxruntime on a transport.

The in-process API (the client SDK and ``conveyor run`` use it)::

    from workers import serve

    async with serve(plan, transport) as worker:        # all stages, device "auto"
        ...                                              # publish requests, read replies

    worker = await serve(plan, transport)                # started; later: await worker.stop()

    worker = serve(plan, transport, stages=["s1"], device="cpu")
    await worker.start()
    ...
    await worker.stop(grace=5.0)

``serve(plan, transport, stages=None, device="auto", settings=None) -> StageWorker``
builds a ``workers.stage_worker.StageWorker``: nothing runs until ``start()``, ``await``
or ``async with``. ``plan``
must be loaded (``Plan.load``: it needs its hash and directory); the transport stays the
caller's to close. ``settings`` (``workers.settings.WorkerSettings``) sets threads,
batching, prefetch, shard and grace; ``device`` overrides ``settings.device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conveyor.plan import Plan
    from conveyor.transport import Transport
    from workers.settings import WorkerSettings
    from workers.stage_worker import StageWorker

__all__ = ["serve"]


def serve(
    plan: Plan,
    transport: Transport,
    stages: Sequence[str] | None = None,
    device: str | None = None,
    settings: WorkerSettings | None = None,
) -> StageWorker:
    """A worker hosting ``stages`` (default: all) of ``plan`` on ``transport``; not started."""
    from dataclasses import replace

    from workers.settings import WorkerSettings
    from workers.stage_worker import StageWorker

    chosen = settings or WorkerSettings()
    if device is not None:
        chosen = replace(chosen, device=device)
    return StageWorker(plan, transport, stages, chosen)
