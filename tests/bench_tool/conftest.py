"""The bench tests reuse the client tests' one-stage plan (y = 3 * x + 1)."""

from tests.client.conftest import scale_plan

__all__ = ["scale_plan"]
