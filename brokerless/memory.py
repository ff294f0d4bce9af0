"""Bounded memory for the whole broker: every message body held is charged to one meter.

A published message is charged once, however many queues it reaches (the body is shared),
and released when its last copy leaves the broker (acked, dropped, expired or
dead-lettered).
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.errors import BackpressureError, ConfigError


@dataclass(frozen=True)
class MemoryStatistics:
    used_bytes: int
    max_bytes: int


class MemoryMeter:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ConfigError(f"brokerless max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.used_bytes = 0

    def charge(self, size: int, copies: int, *, enforce: bool = True) -> Charge:
        """Charge ``size`` bytes shared by ``copies`` queued copies.

        Raises ``BackpressureError`` when ``enforce`` and the broker would exceed its
        budget; dead-lettering passes ``enforce=False`` because it frees as much as it takes.
        """
        if enforce and self.used_bytes + size > self.max_bytes:
            raise BackpressureError(
                f"brokerless broker holds {self.used_bytes} of max_bytes={self.max_bytes}; "
                f"a {size}-byte message does not fit"
            )
        self.used_bytes += size
        return Charge(self, size, copies)

    def statistics(self) -> MemoryStatistics:
        return MemoryStatistics(used_bytes=self.used_bytes, max_bytes=self.max_bytes)


class Charge:
    """The bytes of one published message, freed when its last queued copy is released."""

    __slots__ = ("_meter", "_refs", "size")

    def __init__(self, meter: MemoryMeter, size: int, refs: int) -> None:
        self._meter = meter
        self.size = size
        self._refs = refs

    def release(self) -> None:
        if self._refs <= 0:
            return
        self._refs -= 1
        if self._refs == 0:
            self._meter.used_bytes -= self.size
