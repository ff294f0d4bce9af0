"""``conveyor deploy compose|k8s``: a deployment project generated from a plan
(docs/deploy.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "deploy",
        help="generate a docker-compose project or Kubernetes manifests for a plan",
        description="Write everything a plan needs to run on several machines: RabbitMQ "
        "with least-privilege users, the topology step, one service per stage (join "
        "shards separate), the controller and monitoring. Secrets are generated into files "
        "of mode 600 (or taken from $CONVEYOR_<ROLE>_PASSWORD).",
    )
    kinds = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    for name, help_text in (("compose", "a docker-compose project"),
                            ("k8s", "Kubernetes manifests with KEDA autoscaling")):
        k = kinds.add_parser(name, help=help_text)
        k.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
        k.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help=f"where to write it (default ./deploy-{name})")
        k.add_argument("--queue-type", choices=("classic", "quorum"), default=None,
                       help="input and stage queues (default: the plan's, else quorum)")
        if name == "compose":
            k.add_argument("--gpu", action="store_true",
                           help="every stage on the CUDA image with a GPU reserved")
            k.add_argument("--gpu-stage", action="append", default=[], metavar="NAME",
                           help="only this stage on a GPU (repeat for several)")
        else:
            k.add_argument("--namespace", default="conveyor")
            k.add_argument("--max-scale", type=int, default=4, metavar="F",
                           help="KEDA may scale a stage up to F times its planned workers (4)")
        k.set_defaults(func=cmd_deploy)


def cmd_deploy(args: argparse.Namespace) -> int:
    from conveyor.errors import ConfigError
    from conveyor.plan import Plan

    plan = Plan.load(args.plan)
    out: Path = args.out or Path(f"deploy-{args.target}")
    if args.target == "compose":
        from conveyor.app.deploy.compose import write_compose

        files = write_compose(plan, out, gpu=args.gpu, gpu_stages=tuple(args.gpu_stage),
                              queue_type=args.queue_type)
        hint = f"docker compose -f {out / 'docker-compose.yml'} up"
    else:
        from conveyor.app.deploy.k8s import write_k8s

        if args.max_scale < 1:
            raise ConfigError(f"--max-scale must be at least 1, got {args.max_scale}")
        files = write_k8s(plan, out, namespace=args.namespace, max_scale=args.max_scale,
                          queue_type=args.queue_type)
        hint = f"kubectl apply -f {out}"
    print(f"wrote {len(files)} files into {out} for plan {plan.name} ({plan.short_hash}); "
          f"secrets are mode 600 in {out}; next: {hint}")
    return 0
