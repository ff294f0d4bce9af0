"""``conveyor convert`` and ``conveyor inspect`` (heavy imports only inside the commands)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from conveyor.errors import ConfigError


def add_parsers(sub: Any) -> None:
    conv = sub.add_parser(
        "convert",
        help="export a model to ONNX and split it into a plan directory",
        description="Export MODEL (.onnx, .keras, .h5 or a SavedModel directory) to ONNX, "
        "split it into stages and write PLAN_DIR (plan.json + one .onnx per stage).",
    )
    conv.add_argument("model", help="model file or SavedModel directory")
    conv.add_argument("--out", required=True, type=Path, metavar="PLAN_DIR")
    conv.add_argument("--by", choices=("layer", "function"), default="layer")
    conv.add_argument("--stages", type=int, metavar="K",
                      help="layer: number of stages (default 2); function: at most K stages "
                      "(default 8; the model's structure is merged, cheapest neighbours "
                      "first, and a gather stage for outputs made by several stages counts)")
    conv.add_argument("--group", action="append", default=[], metavar="NAME=REGEX",
                      help="function split: nodes whose name matches REGEX form group NAME")
    conv.add_argument("--profile", action="store_true",
                      help="balance measured onnxruntime time per node instead of FLOPs")
    conv.add_argument("--opset", type=int, help="target opset of the export")
    conv.add_argument("--dims", default="", metavar="NAME=SIZE,...",
                      help="representative sizes of symbolic dimensions (height=640,seq=128) "
                      "the costs are taken at (default 1 each)")
    conv.add_argument("--custom-objects", metavar="FILE.py|MODULE",
                      help="a Keras file's custom layers: a .py file or module defining them "
                      "(its CUSTOM_OBJECTS dict, else its public classes and functions)")
    conv.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS",
                      help="an input or output whose batch is on AXIS, not 0 (state "
                      "[layers, batch, hidden]: h0=1); the plan's tensor is batch-first")
    conv.add_argument("--constant", action="append", default=[], metavar="NAME=VALUE",
                      help="fix a tensor (a model input, or the condition of a top-level If "
                      "decided by the data) to VALUE at plan time: the If's branch is "
                      "inlined and split; the plan always computes the model with it")
    conv.add_argument("--fallback", choices=("layer",),
                      help="--by function on a model without parallel structure: make a "
                      "layer split of --stages K (default 2) instead of exiting 2")
    conv.add_argument("--partition", choices=("random", "hash", "range"), default="random")
    conv.add_argument("--shards", type=int, default=1, help="stage-0 queues (default 1)")
    conv.add_argument("--boundaries", default="",
                      help="range partitioning: comma-separated upper bounds (shards - 1)")
    conv.add_argument("--range-on", default="key", help="range: 'key' or 'dim:TENSOR:AXIS'")
    conv.add_argument("--external-data-threshold", type=int, metavar="BYTES",
                      help="store initializers of at least BYTES in external data files")
    conv.add_argument("--force", action="store_true", help="replace an existing plan")
    conv.set_defaults(func=run_convert)

    insp = sub.add_parser(
        "inspect",
        help="print a plan's stages (or a model's summary) as a table",
        description="Print the stages of PLAN_DIR, or the summary of an ONNX model.",
    )
    insp.add_argument("target", type=Path, help="a plan directory or a .onnx file")
    insp.add_argument("--dot", type=Path, metavar="FILE", help="write the stage DAG as DOT")
    insp.add_argument("--rate", type=float, metavar="R",
                      help="also print the replicas each stage needs for R samples/s")
    insp.add_argument("--replica-flops", type=float, default=None, metavar="F",
                      help="FLOP/s one replica sustains (default 2e10; measure yours)")
    insp.set_defaults(func=run_inspect)


def _partitioning(args: argparse.Namespace) -> Any:
    from conveyor.plan import Partitioning

    try:
        bounds = tuple(float(b) for b in args.boundaries.split(",") if b.strip())
    except ValueError as exc:
        raise ConfigError(f"--boundaries must be numbers separated by commas: {exc}") from exc
    if args.shards < 1:
        raise ConfigError(f"--shards must be at least 1, got {args.shards}")
    if args.partition == "range":
        if len(bounds) != args.shards - 1:
            raise ConfigError(f"--partition range over {args.shards} shards needs "
                              f"{args.shards - 1} --boundaries, got {len(bounds)}")
        if list(bounds) != sorted(bounds):
            raise ConfigError(f"--boundaries must ascend, got {list(bounds)}")
    elif bounds:
        raise ConfigError("--boundaries applies to --partition range only")
    return Partitioning(kind=args.partition, shards=args.shards, range_on=args.range_on,
                        boundaries=bounds)


def parse_dims(text: str) -> dict[str, int]:
    """``height=640,width=640`` -> {"height": 640, "width": 640}."""
    dims: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, size = part.partition("=")
        if not sep or not name or not size.strip().isdigit() or int(size) < 1:
            raise ConfigError(f"--dims {part!r} is not NAME=SIZE with SIZE >= 1")
        dims[name.strip()] = int(size)
    return dims


def run_convert(args: argparse.Namespace) -> int:
    partitioning = _partitioning(args)
    from converter.api import convert
    from converter.batch_axes import parse_batch_axes
    from converter.constants import parse_constants
    from converter.export import load_custom_objects

    custom = load_custom_objects(args.custom_objects) if args.custom_objects else None
    from converter.report import read_report, stage_table

    plan = convert(
        args.model, args.out, by=args.by, stages=args.stages, groups=args.group,
        profile=args.profile, opset=args.opset, partitioning=partitioning,
        external_threshold=args.external_data_threshold, overwrite=args.force,
        dims=parse_dims(args.dims), batch_axes=parse_batch_axes(args.batch_axis),
        custom_objects=custom, constants=parse_constants(args.constant),
        fallback=args.fallback,
    )
    print(stage_table(plan, read_report(args.out)))
    print(f"wrote {plan.directory} (hash {plan.short_hash})")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from converter.report import inspect_target

    text, dot = inspect_target(args.target)
    print(text)
    if args.rate is not None:
        from converter.report import DEFAULT_REPLICA_FLOPS, replica_table
        from conveyor.plan import Plan

        flops = args.replica_flops or DEFAULT_REPLICA_FLOPS
        print(replica_table(Plan.load(args.target), args.rate, flops))
    if args.dot is not None:
        args.dot.write_text(dot)
        print(f"wrote {args.dot}")
    return 0
