"""``conveyor deploy compose|k8s``: a deployment project generated from a plan."""

from __future__ import annotations

from typing import Any


def add_parsers(sub: Any) -> None:
    pass
