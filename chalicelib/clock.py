"""The one clock of the domain, and how its times are written on the wire.

Wall time (UTC) for what is stored and shown; `Deadline` (monotonic) for how
long a request or a scheduled run may still work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime


def now() -> datetime:
    return datetime.now(UTC)


def period(dt: datetime) -> str:
    """The metering period a moment falls in: its UTC month, "2026-12" (chalicelib.metering)."""
    return dt.astimezone(UTC).strftime("%Y-%m")


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds, as Instagres writes it: 2026-02-01T12:00:00.000Z."""
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Deadline:
    """A point on the monotonic clock after which no new work starts."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return time.monotonic() >= self.at
