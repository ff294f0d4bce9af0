"""``conveyor infer`` and ``conveyor demo``: the client side of the command line.

Light at import: numpy, the client and the demo's heavy libraries load inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from conveyor.app.cmd_serve import add_broker_options, add_persistent_option, broker_target
from conveyor.errors import CodecError, ConfigError


def add_parsers(sub: Any) -> None:
    add_infer_parser(sub)
    add_demo_parser(sub)


def add_infer_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "infer",
        help="send one request to a served plan and print its outputs",
        description="Send one request (a .npy for a one-input model, or a .npz of named "
        "inputs) and print the output tensors. With --broker or $CONVEYOR_AMQP_URL it is "
        "sent to the plan's workers on RabbitMQ; otherwise the plan's workers run in this "
        "process on the embedded broker. stderr says which.",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    p.add_argument("input", type=Path, metavar="INPUT", help="INPUT.npy or INPUT.npz")
    add_broker_options(p, embedded=True)
    p.add_argument("--key", default=None, help="partition key (hash / range partitioning)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds (30)")
    p.add_argument("--out", type=Path, default=None, metavar="OUT.npz", help="save outputs")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="durable queues (default; --no-durable as the workers were started)")
    add_persistent_option(p)
    p.set_defaults(func=cmd_infer)


def add_demo_parser(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="split a Keras MLP in 3, serve it with the controller running, check every answer",
        description="Builds a Keras MLP, splits it into 3 stages (the stage table shows the "
        "cuts and the balance), serves the requests with the controller running and compares "
        "every answer with the whole model. In this process on the embedded broker, or with "
        "--broker URL (or $CONVEYOR_AMQP_URL) one `conveyor worker` process per stage on "
        "RabbitMQ, started and stopped by the demo.",
    )
    p.add_argument("--requests", type=int, default=20_000,
                   help="how many requests (20000)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="keep the plan (DIR/layer-3) and the whole model here")
    add_broker_options(p, embedded=True)
    p.set_defaults(func=cmd_demo)


def load_inputs(path: Path, input_names: list[str]) -> dict[str, Any]:
    """Read a request from ``.npy`` (the plan's one input) or ``.npz`` (named inputs)."""
    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise ConfigError(f"input file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise CodecError(f"cannot read {path} as .npy/.npz: {exc}") from exc
    if isinstance(loaded, np.ndarray):
        if len(input_names) != 1:
            raise ConfigError(
                f"the plan takes {len(input_names)} inputs {input_names}; "
                "give them as a .npz with those names"
            )
        return {input_names[0]: loaded}
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def cmd_infer(args: argparse.Namespace) -> int:
    import asyncio

    import numpy as np

    from conveyor.app.connect import connect
    from conveyor.plan import Plan

    plan = Plan.load(args.plan)
    inputs = load_inputs(args.input, [t.name for t in plan.inputs])
    target = broker_target(args)
    where = "in-process workers on " if target.embedded else ""
    print(f"conveyor infer: plan {plan.name!r} on {where}{target.describe()}", file=sys.stderr)

    async def one() -> dict[str, np.ndarray]:
        async with connect(
            target.url, plan=plan, timeout=args.timeout, durable=args.durable,
            persistent=target.persistent, on_no_consumer="fail",
        ) as client:
            return await client.infer(inputs, key=args.key)

    outputs = asyncio.run(one())
    for name, value in outputs.items():
        line = f"{name}: shape {list(value.shape)} {value.dtype}"
        if value.size and np.issubdtype(value.dtype, np.number):
            flat = value.astype(np.float64)
            line += f"  min {flat.min():.6g} max {flat.max():.6g} mean {flat.mean():.6g}"
            if value.ndim == 2 and value.shape[1] > 1:
                line += f"  argmax {value.argmax(axis=1).tolist()}"
        print(line)
    if args.out is not None:
        save: Any = np.savez  # numpy's stub types **kwds as its own keyword arguments
        save(args.out, **outputs)
        print(f"saved {len(outputs)} output(s) to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from conveyor.app.demo import run_demo

    result = run_demo(
        requests=args.requests,
        concurrency=args.concurrency,
        seed=args.seed,
        progress=not args.no_progress,
        workdir=args.out,
        broker=broker_target(args).url,
    )
    if not result.ok:
        print(
            f"conveyor demo: {result.mismatches} answer(s) differ from the whole model",
            file=sys.stderr,
        )
        return 1
    return 0
