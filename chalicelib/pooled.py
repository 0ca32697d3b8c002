"""Where the warm pool's records are: the `by_due` index, bucket `POOLED#<host>`.

Kept apart from chalicelib.pool so that the Context can hold a `Candidates`
without importing the pool's logic (which takes the Context).
"""

from __future__ import annotations

import random
import threading

from chalicelib.models import POOLED, DatabaseRecord

BUCKET_PREFIX = POOLED + "#"
# How many pooled records one take looks at. Concurrent creates each pick at
# random among them, so they rarely race for the same record.
CANDIDATES = 25


def bucket(host_id: str) -> str:
    return BUCKET_PREFIX + host_id


def candidates(host_id: str, limit: int = CANDIDATES) -> list[DatabaseRecord]:
    """Up to `limit` pooled records of a host, shuffled (the index may lag: the take's condition decides)."""
    found = list(DatabaseRecord.by_due.query(bucket(host_id), limit=limit))
    random.shuffle(found)
    return found


class Candidates:
    """Pooled records this process has seen but not tried yet, per host.

    A take pops one instead of querying the index each time, so a warm
    process's pooled create is a single conditional write. Entries go stale
    when another process takes them; the take's condition catches that and
    the next one is tried.
    """

    def __init__(self) -> None:
        self._by_host: dict[str, list[DatabaseRecord]] = {}
        self._lock = threading.Lock()

    def pop(self, host_id: str) -> DatabaseRecord | None:
        with self._lock:
            found = self._by_host.get(host_id)
            return found.pop() if found else None

    def load(self, host_id: str) -> bool:
        """Read the host's pooled records again; False when it has none."""
        found = candidates(host_id)
        with self._lock:
            self._by_host[host_id] = found
        return bool(found)


def pooled(host_id: str) -> list[DatabaseRecord]:
    """Every pooled record of a host (the pool is small: a handful per host)."""
    return list(DatabaseRecord.by_due.query(bucket(host_id)))
