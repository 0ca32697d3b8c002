"""Issue 12.5: the same account retrying a claim 20 at a time gets 20 answers of
success, another account its documented 409, and nobody a 5xx.

Real threads against the service layer (chalice.test.Client shares one
current_request across threads), real Postgres, moto with atomic conditions.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psycopg


def _claim_all(service, database_id: str, accounts: list[str]) -> list[object]:
    from chalicelib import ownership
    from chalicelib.records import Requester

    def one(account: str):
        try:
            return ownership.claim(service, database_id, account, Requester())
        except Exception as exc:  # the outcome under test, whatever it is
            return exc

    with ThreadPoolExecutor(max_workers=len(accounts)) as pool:
        return list(pool.map(one, accounts))


def test_twenty_concurrent_retries_of_one_claim_all_succeed(service, host, pg):
    from chalicelib import creation
    from chalicelib.records import Provisioned, Requester
    from chalicelib.schemas import CreateDatabase

    db = creation.create(service, CreateDatabase(ref="race"), Requester())
    started = time.monotonic()
    results = _claim_all(service, db.record.id, ["acct-a"] * 20)
    ok = sum(1 for r in results if isinstance(r, Provisioned))
    print(f"figure: 20 concurrent claims, same account: {ok} x 200 in {time.monotonic() - started:.2f} s")

    failures = [repr(r) for r in results if not isinstance(r, Provisioned)]
    assert failures == []
    assert all(r.record.status == "CLAIMED" and r.record.owner_id == "acct-a" for r in results)
    with psycopg.connect(pg.superuser_dsn) as conn:
        limit = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (db.record.role_name,)).fetchone()
    assert limit == (service.settings.plan("claimed").connections,)


def test_concurrent_claims_by_two_accounts_give_one_winner_and_409s(service, host, pg):
    from chalicelib import creation, http
    from chalicelib.errors import Conflict, DomainError
    from chalicelib.records import Provisioned, Requester
    from chalicelib.schemas import CreateDatabase

    db = creation.create(service, CreateDatabase(ref="race"), Requester())
    results = _claim_all(service, db.record.id, ["acct-a", "acct-b"] * 10)

    won = {r.record.owner_id for r in results if isinstance(r, Provisioned)}
    assert len(won) == 1
    winner = won.pop()
    for account, result in zip(["acct-a", "acct-b"] * 10, results, strict=True):
        if account == winner:
            assert isinstance(result, Provisioned), repr(result)
        else:
            assert isinstance(result, Conflict), repr(result)
    assert not [r for r in results if isinstance(r, DomainError) and http.status(r) >= 500]
