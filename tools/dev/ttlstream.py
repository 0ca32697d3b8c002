"""DynamoDB's TTL deletion and Lambda's stream event source, for the local stack.

moto never deletes TTL-expired items, and `chalice local` runs no stream
handlers. In production an expired record is deleted by DynamoDB's TTL
(userIdentity: the `dynamodb.amazonaws.com` service principal), and the
stream hands the REMOVE, with the old image, to `drop_removed`. Here:

- `sweep()` deletes items whose TTL attribute is past, in every table that has
  TTL enabled, as DynamoDB does (each delete conditional on the item still
  being expired, so a claim that just removed `expires_at` wins);
- `pump()` reads the databases table's stream from moto and hands every record
  (INSERT, MODIFY and REMOVE, as the event source mapping does) to the app's
  own `drop_removed` handler, in Lambda's event shape: epoch-second
  timestamps, binary values in base64, and on the REMOVEs that `sweep()` caused
  the TTL service's userIdentity. A delete made by anyone else carries none,
  as in production.

`make dev` runs both on a timer (`INSTAPG_LOCAL_TTL_SWEEP_SECONDS`); the
tests call them directly.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from datetime import datetime
from typing import Any

log = logging.getLogger(__name__)

TTL_IDENTITY = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
BATCH_SIZE = 100  # the event source mapping's (app.py)
HANDLER = "drop_removed"


def _lambda_value(value: Any) -> Any:
    """A boto3-parsed attribute value as Lambda's JSON event carries it (binary in base64)."""
    if isinstance(value, dict):
        return {k: _lambda_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_lambda_value(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    return value


def lambda_record(record: dict[str, Any], stream_arn: str, ttl: bool) -> dict[str, Any]:
    """One stream record from GetRecords, reshaped as Lambda delivers it."""
    change = dict(record["dynamodb"])
    when = change.get("ApproximateCreationDateTime")
    if isinstance(when, datetime):
        change["ApproximateCreationDateTime"] = int(when.timestamp())
    for image in ("Keys", "NewImage", "OldImage"):
        if image in change:
            change[image] = _lambda_value(change[image])
    out = {k: v for k, v in record.items() if k != "dynamodb"}
    out["dynamodb"] = change
    out.setdefault("eventSourceARN", stream_arn)
    if ttl:
        out["userIdentity"] = TTL_IDENTITY
    return out


class LocalStream:
    """TTL deletion and stream delivery over moto (the local server or moto in process)."""

    def __init__(self, settings: Any, start_at_latest: bool = True) -> None:
        import boto3

        from chalicelib import models

        kwargs = {"region_name": settings.region}
        if settings.dynamodb_endpoint:
            kwargs["endpoint_url"] = settings.dynamodb_endpoint
        self._dynamodb = boto3.client("dynamodb", **kwargs)
        self._streams = boto3.client("dynamodbstreams", **kwargs)
        self._table = models.DatabaseRecord.Meta.table_name
        self._tables = [model.Meta.table_name for model in models.MODELS]
        self._stream_arn = self._dynamodb.describe_table(TableName=self._table)["Table"]["LatestStreamArn"]
        self._iterators: dict[str, str | None] = {}
        self._ttl_removed: set[str] = set()  # ids sweep() deleted whose REMOVE is not delivered yet
        self._lock = threading.Lock()
        self._start = "LATEST" if start_at_latest else "TRIM_HORIZON"
        self._open_shards()

    def _open_shards(self) -> None:
        shards = self._streams.describe_stream(StreamArn=self._stream_arn)["StreamDescription"]["Shards"]
        for shard in shards:
            if shard["ShardId"] not in self._iterators:
                self._iterators[shard["ShardId"]] = self._streams.get_shard_iterator(
                    StreamArn=self._stream_arn, ShardId=shard["ShardId"], ShardIteratorType=self._start
                )["ShardIterator"]

    def sweep(self, now: float | None = None) -> int:
        """Delete every expired item of every table with TTL on; returns how many."""
        now = time.time() if now is None else now
        deleted = 0
        for table in self._tables:
            ttl = self._dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
            if ttl.get("TimeToLiveStatus") != "ENABLED":
                continue
            attr = ttl["AttributeName"]
            keys = [k["AttributeName"] for k in self._dynamodb.describe_table(TableName=table)["Table"]["KeySchema"]]
            names = {"#ttl": attr, **{f"#k{i}": k for i, k in enumerate(keys)}}
            at = {":now": {"N": f"{now:.3f}"}}
            cond = {"ExpressionAttributeNames": {"#ttl": attr}, "ExpressionAttributeValues": at}
            pages = self._dynamodb.get_paginator("scan").paginate(
                TableName=table,
                FilterExpression="#ttl < :now",
                ProjectionExpression=", ".join(names),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=at,
            )
            for page in pages:
                for item in page["Items"]:
                    key = {k: item[k] for k in keys}
                    if table == self._table:
                        with self._lock:
                            self._ttl_removed.add(key["id"]["S"])
                    try:
                        self._dynamodb.delete_item(TableName=table, Key=key, ConditionExpression="#ttl < :now", **cond)
                        deleted += 1
                    except self._dynamodb.exceptions.ConditionalCheckFailedException:
                        if table == self._table:
                            with self._lock:
                                self._ttl_removed.discard(key["id"]["S"])
        return deleted

    def pump(self, handler=None, max_batches: int = 50) -> int:
        """Deliver what the stream holds to `drop_removed` (the app's, by default); returns records delivered."""
        handler = handler or _app_handler()
        delivered = 0
        self._open_shards()
        for shard_id, iterator in list(self._iterators.items()):
            for _ in range(max_batches):
                if iterator is None:
                    break
                page = self._streams.get_records(ShardIterator=iterator, Limit=BATCH_SIZE)
                iterator = page.get("NextShardIterator")
                self._iterators[shard_id] = iterator
                if not page["Records"]:
                    break
                records = []
                for raw in page["Records"]:
                    ttl = False
                    if raw["eventName"] == "REMOVE":
                        key = raw["dynamodb"]["Keys"]["id"]["S"]
                        with self._lock:
                            ttl = key in self._ttl_removed
                            self._ttl_removed.discard(key)
                    records.append(lambda_record(raw, self._stream_arn, ttl))
                failures = _invoke(handler, records)
                if failures:
                    # Lambda would retry the batch from the first failure, then give up to the
                    # failure queue; here the tombstone and the purge pick them up.
                    log.warning("stream records not handled, left to the purge: %s", failures)
                delivered += len(records)
        return delivered

    def run_forever(self, stopping: threading.Event, every_s: float, pump_every_s: float = 1.0) -> None:
        """`make dev`: sweep every `every_s`, deliver the stream every `pump_every_s`, until `stopping`."""
        next_sweep = time.monotonic() + every_s
        while not stopping.wait(pump_every_s):
            try:
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + every_s
                self.pump()
            except Exception as exc:  # keep the timer alive; the next round retries
                log.warning("local TTL/stream round failed: %s", type(exc).__name__)


def _app_handler():
    from app import app

    return app.handler_map[HANDLER]


def _invoke(handler, records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Call the handler as Lambda would (event, context); returns its batchItemFailures."""
    from chalice.local import LambdaContext

    context = LambdaContext(HANDLER, memory_size=512, max_runtime_ms=60_000)
    answer = handler({"Records": records}, context) or {}
    return list(answer.get("batchItemFailures") or [])
