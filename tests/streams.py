"""DynamoDB stream records of the databases table, as Lambda hands them to `drop_removed`."""

from __future__ import annotations

import base64
import json
import time
import uuid

TTL_IDENTITY = {"type": "Service", "principalId": "dynamodb.amazonaws.com"}


def image(record) -> dict:
    """The record as a stream image carries it (JSON: binary values in base64)."""
    out = {}
    for name, value in record.serialize().items():
        (kind, raw), *_ = value.items()
        out[name] = {kind: base64.b64encode(raw).decode() if kind == "B" else raw}
    return json.loads(json.dumps(out))


def stream_event(settings, name: str, key: str, old: dict | None = None, new: dict | None = None) -> dict:
    """One stream record: `name` is INSERT, MODIFY or REMOVE; `old` and `new` are images."""
    change = {
        "ApproximateCreationDateTime": int(time.time()),
        "Keys": {"id": {"S": key}},
        "SequenceNumber": str(time.time_ns()),
        "SizeBytes": 512,
        "StreamViewType": "NEW_AND_OLD_IMAGES",
    }
    if old is not None:
        change["OldImage"] = old
    if new is not None:
        change["NewImage"] = new
    return {
        "eventID": uuid.uuid4().hex,
        "eventName": name,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": settings.region,
        "eventSourceARN": settings.stream_arn,
        "dynamodb": change,
    }
