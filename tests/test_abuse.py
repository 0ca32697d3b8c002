"""Abuse limits: per-IP create rates, the unclaimed cap per host, Idempotency-Key."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
import pytest

from tests.conftest import post_json


def _settings(env, **values) -> None:
    from chalicelib import context

    for name, value in values.items():
        env.setenv(name, str(value))
    context.reset()


def _tenant_databases(pg, prefix: str) -> int:
    with psycopg.connect(pg.superuser_dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_database WHERE starts_with(datname, %s)", (prefix + "_",)
        ).fetchone()[0]


def _prefix() -> str:
    from chalicelib import context

    return context.get().settings.name_prefix


def _away_from_a_minute_edge() -> None:
    """The minute window is fixed: creates that straddle its end count in two windows."""
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)


def test_creates_per_minute_are_limited_with_retry_after(client, instapg_env, pg):
    _settings(instapg_env, INSTAPG_CREATES_PER_MINUTE=2)
    _away_from_a_minute_edge()
    for _ in range(2):
        assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201
    response = post_json(client, "/api/v1/database", {"ref": "r"})
    assert response.status_code == 429
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    body = response.json_body
    assert body["retry_after_s"] == retry_after
    retry_at = datetime.strptime(body["retry_at"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert retry_at.second == 0 and retry_at > datetime.now(UTC)
    assert "per minute" in body["error"] and body["hint"]
    assert _tenant_databases(pg, _prefix()) == 2  # the refused create made nothing


def test_creates_per_day_are_limited(client, instapg_env):
    _settings(instapg_env, INSTAPG_CREATES_PER_DAY=1)
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201
    response = post_json(client, "/api/v1/database", {"ref": "r"})
    assert response.status_code == 429
    # Retry at the next UTC midnight.
    assert int(response.headers["Retry-After"]) == pytest.approx(86400 - time.time() % 86400, abs=5)
    assert "per day" in response.json_body["error"]


def test_rate_counters_are_per_ip_per_window_and_expire(service):
    from chalicelib.errors import RateLimited
    from chalicelib.models import RateCounter

    guard = service.guard
    now = 1_800_000_030.0  # 30 s into a minute
    for _ in range(service.settings.creates_per_minute):
        guard.check_rate("198.51.100.7", now=now)
    with pytest.raises(RateLimited) as exc:
        guard.check_rate("198.51.100.7", now=now)
    assert exc.value.retry_after == 30
    guard.check_rate("203.0.113.9", now=now)  # another client is not affected
    guard.check_rate("198.51.100.7", now=now + 30)  # the next minute starts afresh
    # One item per IP and UTC day counts both windows (1_800_000_000 is 08:00 UTC, minute 480).
    day = 1_800_000_000 // 86400 * 86400
    counter = RateCounter.get(f"{day}#198.51.100.7", consistent_read=True)
    assert counter.count == service.settings.creates_per_minute + 2  # the refused one counts too
    raw = RateCounter._get_connection().get_item(f"{day}#198.51.100.7", consistent_read=True)["Item"]
    minute = (1_800_000_000 - day) // 60
    assert raw[f"m{minute + 1}"] == {"N": "1"}
    assert f"m{minute}" not in raw  # the previous minute is dropped by the next minute's write
    # The item goes by DynamoDB TTL shortly after its day.
    assert day + 86400 <= counter.expires_at.timestamp() <= day + 86400 + 200


def test_unclaimed_cap_per_host_gives_503_no_capacity(client, instapg_env, pg):
    _settings(instapg_env, INSTAPG_MAX_UNCLAIMED_PER_HOST=2)
    for _ in range(2):
        assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201
    response = post_json(client, "/api/v1/database", {"ref": "r"})
    assert response.status_code == 503
    assert response.json_body["error"] == "No capacity"
    assert response.headers["Retry-After"]
    assert _tenant_databases(pg, _prefix()) == 2


def test_idempotency_key_returns_the_first_database(client, pg):
    headers = {"Idempotency-Key": "retry-me-1"}
    first = post_json(client, "/api/v1/database", {"ref": "r"}, headers)
    second = post_json(client, "/api/v1/database", {"ref": "r"}, headers)
    assert first.status_code == 201 and second.status_code == 200
    assert second.json_body["id"] == first.json_body["id"]
    assert second.json_body["connection_string"] == first.json_body["connection_string"]
    other = post_json(client, "/api/v1/database", {"ref": "r"}, {"Idempotency-Key": "retry-me-2"})
    assert other.status_code == 201 and other.json_body["id"] != first.json_body["id"]
    assert _tenant_databases(pg, _prefix()) == 2


def test_idempotency_key_is_scoped_to_the_client_ip(service, host):
    from chalicelib import creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    request = CreateDatabase(ref="r")
    a = creation.create(service, request, Requester(ip="198.51.100.1", idempotency_key="k"))
    b = creation.create(service, request, Requester(ip="198.51.100.2", idempotency_key="k"))
    again = creation.create(service, request, Requester(ip="198.51.100.1", idempotency_key="k"))
    assert a.record.id != b.record.id
    assert again.record.id == a.record.id and not again.created


def test_idempotency_store_holds_no_password_or_raw_key(client):
    from chalicelib.models import IdempotencyRecord

    body = post_json(client, "/api/v1/database", {"ref": "r"}, {"Idempotency-Key": "secret-ish-key"}).json_body
    password = psycopg.conninfo.conninfo_to_dict(body["connection_string"])["password"]
    items = [item.attribute_values for item in IdempotencyRecord.scan()]
    assert len(items) == 1 and items[0]["database_id"] == body["id"]
    assert password not in repr(items) and "secret-ish-key" not in repr(items)
    assert items[0]["expires_at"].timestamp() - time.time() == pytest.approx(86400, abs=60)


def test_replay_does_not_count_against_the_rate_limit(client, instapg_env):
    _settings(instapg_env, INSTAPG_CREATES_PER_MINUTE=1)
    _away_from_a_minute_edge()
    headers = {"Idempotency-Key": "once"}
    assert post_json(client, "/api/v1/database", {"ref": "r"}, headers).status_code == 201
    assert post_json(client, "/api/v1/database", {"ref": "r"}, headers).status_code == 200
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 429


def test_failed_idempotent_create_frees_the_key(client, instapg_env):
    from chalicelib.models import IdempotencyRecord

    _settings(instapg_env, INSTAPG_MAX_UNCLAIMED_PER_HOST=0)
    headers = {"Idempotency-Key": "k1"}
    assert post_json(client, "/api/v1/database", {"ref": "r"}, headers).status_code == 503
    assert list(IdempotencyRecord.scan()) == []
    _settings(instapg_env, INSTAPG_MAX_UNCLAIMED_PER_HOST=5)
    assert post_json(client, "/api/v1/database", {"ref": "r"}, headers).status_code == 201


@pytest.mark.parametrize("key", ["x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_idempotency_key_is_400(client, key):
    response = client.http.post(
        "/api/v1/database",
        body=b'{"ref": "r"}',
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json_body["error"]


def test_unclaimed_cap_is_per_host_and_spills_to_the_next(client, instapg_env, service, pg):
    from chalicelib import hosts
    from chalicelib.models import DatabaseRecord
    from tests.conftest import ADMIN_ENV

    hosts.register(service.settings, "local-2", pg.host, pg.port, f"env:{ADMIN_ENV}", capacity=1000, sslmode="disable")
    _settings(instapg_env, INSTAPG_MAX_UNCLAIMED_PER_HOST=1)
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201
    assert sorted(r.host_id for r in DatabaseRecord.scan()) == ["local-1", "local-2"]
    response = post_json(client, "/api/v1/database", {"ref": "r"})
    assert response.status_code == 503 and response.json_body["error"] == "No capacity"


def test_in_process_callers_without_an_ip_are_not_rate_limited(host, instapg_env):
    from chalicelib import context, creation
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    _settings(instapg_env, INSTAPG_CREATES_PER_MINUTE=1)
    service = context.get()
    for _ in range(2):
        assert creation.create(service, CreateDatabase(ref="tool"), Requester()).created


def test_concurrent_creates_from_one_ip_get_exactly_the_limit(host, instapg_env):
    """The count's condition is checked in the write: pooled takes (one transaction with the
    count) and on-demand creates (the count alone) racing from one IP pass the limit never."""
    from chalicelib import context, creation, pool
    from chalicelib.clock import Deadline
    from chalicelib.errors import RateLimited
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase

    _settings(instapg_env, INSTAPG_CREATES_PER_MINUTE=3)
    service = context.get()
    pool.refill(service, Deadline.after(120), size=2)  # two come from the pool, the rest on demand
    pooled_ids = {r.id for r in pool.pooled("local-1")}
    _away_from_a_minute_edge()

    def one(i: int) -> str:
        try:
            creation.create(service, CreateDatabase(ref=f"race{i}"), Requester(ip="198.51.100.9"))
        except RateLimited:
            return "429"
        return "201"

    with ThreadPoolExecutor(max_workers=6) as executor:
        outcomes = list(executor.map(one, range(6)))
    assert sorted(outcomes) == ["201"] * 3 + ["429"] * 3
    from chalicelib.models import DatabaseRecord

    unclaimed = [r for r in DatabaseRecord.scan() if r.status == "UNCLAIMED"]
    assert len(unclaimed) == 3  # a refused create took nothing from the pool and made nothing
    left = {r.id for r in pool.pooled("local-1")}
    assert left | {r.id for r in unclaimed} >= pooled_ids and not left & {r.id for r in unclaimed}


def test_claimed_databases_do_not_count_against_the_unclaimed_cap(client, instapg_env):
    """A host at the cap by its `allocated` has its unclaimed records counted: claimed ones are not."""
    _settings(instapg_env, INSTAPG_MAX_UNCLAIMED_PER_HOST=1)
    first = post_json(client, "/api/v1/database", {"ref": "r"}).json_body["id"]
    key = post_json(client, "/api/v1/accounts", {"email": "cap@example.com"}).json_body["api_key"]
    claim = client.http.post(f"/api/v1/database/{first}/claim", headers={"Authorization": f"Bearer {key}"})
    assert claim.status_code == 200
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 201  # allocated 1, unclaimed 0
    assert post_json(client, "/api/v1/database", {"ref": "r"}).status_code == 503  # unclaimed 1
