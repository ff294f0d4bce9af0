"""The runners a ``StageWorker`` hosts: one per stage (its onnxruntime session loaded on a
thread, its batching from the plan's schedule unless the settings say otherwise) and the
ingress, linked so the ingress starts a batch only when the local stages it feeds can."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from conveyor.plan import MODEL_INPUT, Plan
from workers.routes import Routes
from workers.runner import Router, StageRunner, stage_sources
from workers.session import StageSession
from workers.settings import WorkerSettings
from workers.tracing import StageTracer

log = logging.getLogger("workers.stage_worker")


async def build_runners(
    plan: Plan,
    s: WorkerSettings,
    hosted: Sequence[str],
    hosts_ingress: bool,
    router: Router,
    worker_id: str,
) -> dict[str, StageRunner]:
    """The runners of ``hosted`` (and the ingress when ``hosts_ingress``)."""
    runners: dict[str, StageRunner] = {}
    threads = s.threads_per_stage(len(hosted))
    for name in hosted:
        spec = plan.stage(name)
        session = await asyncio.to_thread(
            StageSession.load,
            plan.stage_path(name),
            spec,
            device=s.device,
            threads=threads,
            inter_threads=s.inter_op_threads,
        )
        log.info("stage %s: %s (%s)", name, session.provider, session.choice.reason)
        sched = plan.scheduling.for_stage(name)
        runner = runners[name] = StageRunner(
            name,
            spec,
            session,
            router,
            max_batch=s.max_batch or sched.max_batch,
            max_delay_ms=sched.max_delay_ms if s.max_delay_ms is None else s.max_delay_ms,
            sources=stage_sources(spec),
            join_timeout=s.join_timeout,
            batch_wait=s.batch_wait,
        )
        runner.tracer = StageTracer.for_process(name, worker_id)
        runner.timings.enabled = s.metrics
    if hosts_ingress:
        sched = plan.scheduling.for_stage(plan.stages[0].name)
        ingress = runners[MODEL_INPUT] = StageRunner(
            MODEL_INPUT,
            None,
            None,
            router,
            max_batch=s.max_batch or sched.max_batch,
            max_delay_ms=sched.max_delay_ms if s.max_delay_ms is None else s.max_delay_ms,
            sources=(),
            batch_wait=s.batch_wait,
        )
        ingress.timings.enabled = s.metrics
    return runners


def link_runners(runners: Mapping[str, StageRunner], routes: Routes) -> None:
    """The ingress can start a batch only when the local stages it feeds can."""
    ingress = runners.get(MODEL_INPUT)
    if ingress is None:
        return
    for dest in routes.destinations.get(MODEL_INPUT, []):
        if dest.local:
            runner = runners[dest.stage]
            ingress.hands_to.append(runner)
            runner.fed_by.append(ingress)
