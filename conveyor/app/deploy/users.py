"""Least-privilege RabbitMQ users for one plan (``conveyor users``; docs/deploy.md).

RabbitMQ checks three regular expressions per user and vhost: *configure* (declare and
delete a queue or exchange), *write* (publish to an exchange; bind a queue: write on the
queue) and *read* (consume or purge a queue; bind: read on the exchange). The roles below
match what each Conveyor process does with the plan's names (``conveyor.topology``, for a
plan ``H``: ``conveyor.H.input``, ``conveyor.H.stage.S``, ``conveyor.H.control...``):

==========  ==============================  ================================  =====================
role        configure                        write                             read
==========  ==============================  ================================  =====================
admin       everything in the vhost          everything                        everything
client      its reply queues                 the input exchange                its reply queues
worker      control exchange, own command    stage exchanges, control, its     input and stage
            queue                            command queue, the default        queues and their
                                             exchange (replies, suspects)      suspect queues,
                                                                               control, its
                                                                               command queue
controller  control exchange and queues      control, input shard queues       control, input
                                             (rebinding partitions)            exchange
==========  ==============================  ================================  =====================

So a client can publish requests and read its own (exclusive) reply queue, and nothing
else: it cannot bind a queue to the input exchange, purge or delete a stage queue. The
topology is declared by the admin step (``conveyor topology``); clients run with
``declare_topology=False`` and workers with ``--no-declare``. What remains wider than it
should be: a worker may publish to any queue through the default exchange (that is how
replies travel; RabbitMQ cannot limit it by routing key) and may purge the queues it reads.

Passwords never appear here: the definitions carry salted SHA-256 hashes
(``rabbit_password_hashing_sha256``) of passwords kept in mode-600 files
(``conveyor.app.deploy.secrets``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from conveyor.plan import Plan
from conveyor.topology import Topology
from conveyor.topology_setup import consumes_stage_queue, stage_queues

ROLES = ("admin", "client", "worker", "controller")
#: ``Client.reply_queue``: the plan's base, ``.reply.``, a uuid4 in hex.
REPLY_SUFFIX = r"\.reply\.[0-9a-f]{32}"
HASHING = "rabbit_password_hashing_sha256"


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


@dataclass(frozen=True)
class Role:
    name: str
    username: str
    permissions: Permissions
    #: Management-plugin tags (``administrator`` for the admin, none for the others).
    tags: tuple[str, ...] = ()


def _any_of(names: list[str]) -> str:
    """A regex matching exactly these names (RabbitMQ matches permissions unanchored)."""
    return "^(" + "|".join(re.escape(n) for n in sorted(set(names))) + ")$"


def plan_roles(plan: Plan, prefix: str = "conveyor") -> list[Role]:
    """The four roles of ``plan``, users named ``<prefix>-<role>``."""
    topo = Topology.of(plan)
    base = re.escape(topo.base)
    control = topo.control_exchange
    ctl = re.escape(control)
    inputs = [topo.input_queue(i) for i in range(plan.partitioning.shards)]
    stage_exchanges = [
        topo.stage_exchange(s.name) for s in plan.stages if consumes_stage_queue(plan, s)
    ]
    consumed = [q for s in plan.stages for q in stage_queues(plan, s)]
    consumed += [topo.suspect_queue(q) for q in consumed]  # workers read their suspects
    command = rf"{ctl}\.cmd\..+"
    reply = f"^{base}{REPLY_SUFFIX}$"
    own = f"^({ctl}|{command})$"  # the control exchange and a worker's command queue
    return [
        Role("admin", f"{prefix}-admin", Permissions(".*", ".*", ".*"), ("administrator",)),
        Role("client", f"{prefix}-client", Permissions(reply, _any_of([topo.input_exchange]),
                                                        reply)),
        Role("worker", f"{prefix}-worker", Permissions(
            configure=own,
            write=f"{_any_of([*stage_exchanges, control])}|^({command})$|^amq\\.default$",
            read=f"{_any_of([*consumed, control])}|^({command})$",
        )),
        Role("controller", f"{prefix}-controller", Permissions(
            configure=f"^{ctl}(\\..+)?$",
            write=f"^{ctl}(\\..+)?$|{_any_of(inputs)}",
            read=f"^{ctl}(\\..+)?$|{_any_of([topo.input_exchange])}",
        )),
    ]


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))
    with a 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def definitions(
    plan: Plan, passwords: Mapping[str, str], *, vhost: str = "/", prefix: str = "conveyor"
) -> dict[str, object]:
    """A RabbitMQ definitions document (``rabbitmqctl import_definitions``, the management
    API's ``POST /api/definitions``, or ``load_definitions`` at boot) with the vhost, the
    users (password hashes) and their permissions. Queues are left to ``conveyor topology``:
    a definitions import at every boot would re-add bindings the controller has moved."""
    roles = plan_roles(plan, prefix)
    return {
        "users": [
            {"name": r.username, "password_hash": password_hash(passwords[r.name]),
             "hashing_algorithm": HASHING, "tags": ",".join(r.tags)}
            for r in roles
        ],
        "vhosts": [{"name": vhost}],
        "permissions": [
            {"user": r.username, "vhost": vhost, "configure": r.permissions.configure,
             "write": r.permissions.write, "read": r.permissions.read}
            for r in roles
        ],
    }


def definitions_json(plan: Plan, passwords: Mapping[str, str], **options: str) -> str:
    return json.dumps(definitions(plan, passwords, **options), indent=2) + "\n"


def rabbitmqctl_script(
    plan: Plan, users_file: str, *, vhost: str = "/", prefix: str = "conveyor"
) -> str:
    """A shell script of ``rabbitmqctl`` commands. ``rabbitmqctl add_user`` takes the
    password as an argument, so the users come in as hashes from ``users_file`` (the
    definitions document) and only vhost, permissions and tags are commands here."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# RabbitMQ users of plan {plan.name} ({plan.short_hash}); generated by conveyor users",
        "set -eu",
        f"rabbitmqctl add_vhost {q(vhost)} || true  # fails harmlessly when it exists",
        # users as password hashes. rabbitmqctl reads the file as the broker's user (the
        # Debian wrapper switches to it) and 3.10 has no stdin form: hand it a copy that
        # user may read, removed right after.
        'copy=$(mktemp)',
        'trap \'rm -f "$copy"\' EXIT',
        f'cat {q(users_file)} > "$copy"',
        'chown rabbitmq "$copy" 2>/dev/null || chmod 644 "$copy"',
        'rabbitmqctl import_definitions "$copy"',
    ]
    for r in plan_roles(plan, prefix):
        p = r.permissions
        lines.append(
            f"rabbitmqctl set_permissions -p {q(vhost)} {q(r.username)} "
            f"{q(p.configure)} {q(p.write)} {q(p.read)}"
        )
        lines.append(f"rabbitmqctl set_user_tags {q(r.username)} {' '.join(map(q, r.tags))}"
                     .rstrip())
    return "\n".join(lines) + "\n"
