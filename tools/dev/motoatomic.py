"""Make moto's DynamoDB writes atomic, as DynamoDB's are.

moto checks a write's condition and applies the write as separate Python
steps with no lock, so two threads can both pass `status = POOLED` on the
same item; DynamoDB evaluates the condition and writes atomically. The local
stack, the benchmark and the concurrency tests serve requests from many
threads, so they call `install()`: one lock around every moto write (and
read, so no read sees half a write).
"""

from __future__ import annotations

import functools
import threading

_lock = threading.RLock()
_METHODS = (
    "put_item",
    "update_item",
    "delete_item",
    "get_item",
    "query",
    "scan",
    "transact_write_items",
    "transact_get_items",
    "batch_get_item",
)


def install() -> None:
    """Idempotent; wraps moto's DynamoDB backend methods for this process."""
    from moto.dynamodb.models import DynamoDBBackend

    for name in _METHODS:
        original = getattr(DynamoDBBackend, name, None)
        if original is None or getattr(original, "_instapg_atomic", False):
            continue

        def locked(*args, __original=original, **kwargs):
            with _lock:
                return __original(*args, **kwargs)

        functools.update_wrapper(locked, original)
        locked._instapg_atomic = True
        setattr(DynamoDBBackend, name, locked)
