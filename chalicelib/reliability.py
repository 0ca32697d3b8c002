"""Timeouts, deadlines and retry delays, in one place (docs/reliability.md).

Every API request runs under a deadline (INSTAPG_REQUEST_DEADLINE_SECONDS,
10 s): AWS calls have connect/read timeouts and bounded retries, and the
service's Postgres sessions opened during a request get connect and
statement timeouts cut to the time the request has left. So one fault (a
hanging DynamoDB endpoint, a stopped Postgres) ends in a 503 with
Retry-After before the deadline, well under the Lambda's and API Gateway's
timeouts.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from chalicelib.clock import Deadline

if TYPE_CHECKING:
    from botocore.config import Config

    from chalicelib.settings import Settings

# Failed drops: first retry after DROP_BACKOFF_BASE_S, doubling, capped, so
# leftovers go within cap + one purge interval (90 s + 60 s) of their host
# coming back, and a host that stays down costs one attempt per record every
# DROP_BACKOFF_CAP_S.
DROP_BACKOFF_BASE_S = 5
DROP_BACKOFF_CAP_S = 90


def drop_backoff_s(attempts: int) -> int:
    """Seconds before the next drop attempt, after `attempts` failed ones."""
    return min(DROP_BACKOFF_BASE_S * 2 ** min(attempts, 10), DROP_BACKOFF_CAP_S)


def botocore_config(settings: Settings) -> Config:
    """Timeouts and bounded retries for every boto3 client the service makes."""
    from botocore.config import Config

    return Config(
        connect_timeout=settings.aws_connect_timeout_s,
        read_timeout=settings.aws_read_timeout_s,
        retries={"total_max_attempts": settings.aws_max_attempts, "mode": "standard"},
    )


# -- the request deadline ----------------------------------------------------------
#
# The one piece of state outside the Context: a request's deadline belongs to
# the request, not the process, and `chalice local` serves requests on
# threads; so it is kept per thread, like Chalice's own current_request.
_local = threading.local()


@contextmanager
def request_deadline(seconds: float) -> Iterator[Deadline]:
    """Run the block (one API request) under a deadline `seconds` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = Deadline.after(seconds)
    try:
        yield _local.deadline
    finally:
        _local.deadline = previous


def time_left() -> float | None:
    """Seconds the current request has left; None outside a request (jobs are handed their own Deadline)."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else deadline.left()


def bounded(seconds: float) -> float:
    """`seconds`, cut to what the current request has left (at least 1 s, so the call fails fast, not never)."""
    left = time_left()
    if left is None:
        return seconds
    return max(1.0, min(seconds, left - 1.0))


# -- fault injection for the fault suite -------------------------------------------

PAUSE_ENV = "INSTAPG_FAULT_PAUSE_AT"


def pause_point(name: str) -> None:
    """Test hook: when INSTAPG_FAULT_PAUSE_AT names this point, say so on stdout and wait to be killed.

    Read from the environment on purpose (not settings): nothing deployed
    sets it, and the fault suite sets it only in the child processes it
    kills with SIGKILL (tests/faults/).
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    print(f"paused at {name}", flush=True)
    time.sleep(300)
