"""By-hand GPU check of the worker (not collected by pytest; CI has no GPU).

On the device machine (see shared/gpu/README.md)::

    . .ortgpu/prelude.sh && python -m tests.workers.gpu_check

Serves a 3-stage chain with ``--device cuda`` on the brokerless broker, so batches pass
between the stages through IO binding on the device, checks every answer against numpy
and that the sessions really got the CUDA provider. Prints one line per check; exit 1 on
any failure.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

import numpy as np


async def main() -> int:
    from brokerless import Broker
    from conveyor.plan import Plan
    from tests.support.pipeline import Harness
    from tests.support.plans import chain_expected, chain_plan
    from workers import serve
    from workers.session import CUDA

    with tempfile.TemporaryDirectory() as tmp:
        plan = Plan.load(chain_plan(Path(tmp), k=3, width=256, max_batch=16).directory)
        broker = Broker()
        client = await Harness(broker.connect(), plan).open()
        async with serve(plan, broker.connect(), device="cuda") as worker:
            providers = worker.providers
            print("providers:", providers)
            xs = np.random.default_rng(0).random((200, 1, 256), dtype=np.float32)
            ids = [await client.send({"x": x}) for x in xs]
            await client.wait_for(ids, within=60)
            bad = 0
            for rid, x in zip(ids, xs, strict=True):
                result = client.one(rid)
                if isinstance(result, Exception) or not np.allclose(
                    result["y"], chain_expected(x), rtol=1e-4
                ):
                    bad += 1
            print(f"answers: {len(ids) - bad}/{len(ids)} correct")
            print("stats:", worker.snapshot().stages)
    ok = bad == 0 and all(p == CUDA for p in providers.values())
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
