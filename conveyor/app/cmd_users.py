"""``conveyor users``: per-role RabbitMQ users with least-privilege permissions for a plan.

Passwords come from ``$CONVEYOR_<ROLE>_PASSWORD`` or are generated, and are kept in
``--secrets DIR`` (files mode 600); what is printed carries only their hashes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from conveyor.errors import ConfigError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "users",
        help="least-privilege RabbitMQ users (admin, client, worker, controller) for a plan",
        description="Print the RabbitMQ users of a plan's roles with regex permissions on the "
        "plan's exchanges and queues (docs/deploy.md): as a definitions document (import it "
        "with `rabbitmqctl import_definitions FILE` or load it at boot) or as rabbitmqctl "
        "commands. Passwords: $CONVEYOR_<ROLE>_PASSWORD, else the ones in --secrets from an "
        "earlier run, else new; they are written to --secrets/<role>.password (mode 600) "
        "and never printed.",
    )
    p.add_argument("plan", type=Path, metavar="PLAN_DIR", help="the plan directory")
    p.add_argument("--format", choices=("definitions", "rabbitmqctl"), default="definitions")
    p.add_argument("--vhost", default="/", help="the RabbitMQ vhost (default /)")
    p.add_argument("--prefix", default="conveyor",
                   help="user names are PREFIX-admin, PREFIX-client, ... (default conveyor)")
    p.add_argument("--secrets", type=Path, default=Path("secrets"), metavar="DIR",
                   help="where the password files are kept (default ./secrets)")
    p.add_argument("--out", type=Path, metavar="FILE",
                   help="write the definitions here instead of printing them")
    p.set_defaults(func=cmd_users)


def cmd_users(args: argparse.Namespace) -> int:
    from conveyor.app.deploy.secrets import role_passwords, write_private
    from conveyor.app.deploy.users import ROLES, definitions_json, rabbitmqctl_script
    from conveyor.plan import Plan

    if not args.prefix or not args.prefix.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--prefix must be letters, digits, '-' or '_', got {args.prefix!r}")
    plan = Plan.load(args.plan)
    passwords = role_passwords(args.secrets, ROLES)
    document = definitions_json(plan, passwords, vhost=args.vhost, prefix=args.prefix)
    if args.format == "rabbitmqctl":
        users_file = args.out or args.secrets / "users.json"
        write_private(users_file, document)
        print(rabbitmqctl_script(plan, str(users_file), vhost=args.vhost, prefix=args.prefix),
              end="")
    elif args.out is not None:
        write_private(args.out, document)
        print(f"wrote {args.out} (passwords in {args.secrets}/)")
    else:
        print(document, end="")
    return 0
