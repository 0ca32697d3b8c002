"""Issue 18 §3: the local stack's TTL deletion and stream (tools/dev/ttlstream.py), end to end.

moto (in process) holds the tables and their stream; the app's own
`drop_removed` handler gets the records; the purge never runs here, so a
database that goes went through the stream path.
"""

from __future__ import annotations

import time

import pytest

from tests.test_expiry import catalog, reconfigure


@pytest.fixture
def local_stream(host, instapg_env):
    from tools.dev.ttlstream import LocalStream

    service = reconfigure(instapg_env, INSTAPG_UNCLAIMED_LIFETIME_SECONDS=1, INSTAPG_POOL_SIZE=0)
    service.hosts.invalidate()
    return LocalStream(service.settings)


def _create(client) -> dict:
    from tests.conftest import post_json

    response = post_json(client, "/api/v1/database", {"ref": "stream"})
    assert response.status_code == 201, response.body
    return response.json_body


def _wait_until_expired(database_id: str) -> None:
    """Until the clock passes the record's expires_at (whole seconds in the table), never longer."""
    from chalicelib import records

    expires_at = records.find(database_id).expires_at.timestamp()
    time.sleep(max(0.0, expires_at - time.time()) + 0.05)


def _db_name(database_id: str) -> str:
    from chalicelib import records

    return records.find(database_id).db_name


def test_an_expired_database_goes_through_ttl_and_the_stream_and_get_answers_410(client, local_stream, pg):
    from chalicelib import audit, records

    local_stream.sweep()  # what earlier tests of this session left expired in the shared tables
    local_stream.pump()
    created = _create(client)
    name = _db_name(created["id"])
    # A sweep just before its expiry keeps it (the clock is the sweep's argument: a slow create under load
    # may already have used up the one-second lifetime).
    local_stream.sweep(now=records.find(created["id"]).expires_at.timestamp() - 0.5)
    assert records.find(created["id"]) is not None
    _wait_until_expired(created["id"])
    assert local_stream.sweep() >= 1
    assert records.find(created["id"]) is None
    assert client.http.get(f"/api/v1/database/{created['id']}").status_code == 404  # deleted, not yet delivered
    assert local_stream.pump() >= 1

    assert catalog(pg, name) == (False, False)
    response = client.http.get(f"/api/v1/database/{created['id']}")
    assert response.status_code == 410
    assert response.json_body["error"] == "Database expired"
    # The stream path, not the purge's: no "purged" event, and the handler saw TTL's principal.
    assert audit.PURGED not in {e.action for e in audit.page(created["id"]).events}


def test_a_record_deleted_by_hand_drops_its_database_and_get_says_what_production_says(
    client, local_stream, pg, instapg_env
):
    from chalicelib.models import DatabaseRecord

    reconfigure(instapg_env, INSTAPG_UNCLAIMED_LIFETIME_SECONDS=3600)  # nothing expires here

    created = _create(client)
    kept = _create(client)
    name = _db_name(created["id"])
    DatabaseRecord(id=created["id"]).delete()  # an operator's delete: no TTL identity
    assert local_stream.pump() >= 1

    assert catalog(pg, name) == (False, False)
    response = client.http.get(f"/api/v1/database/{created['id']}")
    assert response.status_code == 410 and response.json_body["error"] == "Database expired"
    assert client.http.get(f"/api/v1/database/{kept['id']}").status_code == 200
    assert catalog(pg, _db_name(kept["id"])) == (True, True)


def test_records_reach_the_handler_in_lambdas_shape(client, local_stream):
    from chalicelib.models import DatabaseRecord

    seen: list[dict] = []

    def handler(event, context):
        seen.extend(event["Records"])
        assert context.get_remaining_time_in_millis() > 0
        return {"batchItemFailures": []}

    created = _create(client)
    _wait_until_expired(created["id"])
    local_stream.sweep()
    kept = _create(client)
    DatabaseRecord(id=kept["id"]).delete()
    local_stream.pump(handler)
    removes = {r["dynamodb"]["Keys"]["id"]["S"]: r for r in seen if r["eventName"] == "REMOVE"}
    assert removes[created["id"]]["userIdentity"] == {"type": "Service", "principalId": "dynamodb.amazonaws.com"}
    assert "userIdentity" not in removes[kept["id"]]
    record = removes[created["id"]]
    assert isinstance(record["dynamodb"]["ApproximateCreationDateTime"], int)
    assert record["eventSource"] == "aws:dynamodb" and "/stream/" in record["eventSourceARN"]
    # The old image parses as the record it was (binary values as base64 text, as Lambda sends them).
    old = DatabaseRecord.from_raw_data(record["dynamodb"]["OldImage"])
    assert old.id == created["id"] and old.secret
