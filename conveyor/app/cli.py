"""The ``conveyor`` command line: every sub-command is registered here.

The command modules (``conveyor.app.cmd_*``) are light at import; heavy libraries
(TensorFlow, onnxruntime, aio-pika) load inside the command that needs them. Every
``ConveyorError`` ends the program with its message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from conveyor import __version__
from conveyor.app.logs import LOG_FORMATS, configure_logging
from conveyor.errors import ConveyorError

#: Modules with ``add_parsers(subparsers)``; each sets ``func`` on its sub-parsers.
COMMAND_MODULES = (
    "conveyor.app.cmd_convert",  # convert, inspect
    "conveyor.app.cmd_serve",  # worker, run
    "conveyor.app.cmd_client",  # infer, demo
    "conveyor.app.cmd_controller",  # controller
    "conveyor.app.cmd_gateway",  # gateway
    "conveyor.app.cmd_bench",  # bench
    "conveyor.app.cmd_users",  # users
    "conveyor.app.cmd_topology",  # topology
    "conveyor.app.cmd_deploy",  # deploy compose, deploy k8s
    "conveyor.app.cmd_status",  # status
    "conveyor.app.cmd_dead",  # dead, clean
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Split a model into ONNX stages and serve them."
    )
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    for command in sub.choices.values():
        # -v after the sub-command too (``conveyor worker PLAN -v``).
        command.add_argument(
            "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging"
        )
        command.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS,
                             help="text (default) or json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    configure_logging(level, args.log_format)
    try:
        code = args.func(args)
    except ConveyorError as exc:
        print(f"conveyor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
