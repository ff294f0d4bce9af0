"""The ``conveyor`` command line.

Each component registers its own sub-commands (``converter.commands``,
``workers.commands``); those modules are light and import heavy libraries (TensorFlow,
onnxruntime) only inside the command that needs them. Every ``ConveyorError`` ends the
program with its message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from conveyor.errors import ConveyorError

#: Modules with ``add_parsers(subparsers)``; each sets ``func`` on its sub-parsers.
COMMAND_MODULES = ("converter.commands", "workers.commands", "workers.controller_commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor", description="Split a model into ONNX stages and serve them."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
