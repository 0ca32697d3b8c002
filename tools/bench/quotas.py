"""How long one quota pass, and one metering pass, take over N tenant databases on one host.

    .venv/bin/python -m tools.bench.quotas [N]

Runs on this machine only: an embedded Postgres on 127.0.0.1 (data on
/dev/shm when it exists) with the non-superuser admin, and DynamoDB in
process (moto). Creates N databases, then times `quotas.enforce`: the first
pass (writes every size), a pass with nothing changed, one locking every
database (plan lowered to 1 MB), one unlocking them. Then `metering.run`
(chalicelib.metering): the first pass of a day (a usage row per database),
then one with nothing changed (one batched read, no write). The host has no
pooler here, so no transfer is written: that costs one transaction per
database that moved bytes (tests/test_metering.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time


def main(count: int) -> None:
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-2",
        AWS_ACCOUNT_ID_ENDPOINT_MODE="disabled",
        INSTAPG_TABLE_PREFIX="instapg-bench",
        INSTAPG_CREATES_PER_MINUTE=str(count + 1),
        INSTAPG_CREATES_PER_DAY=str(count + 1),
        INSTAPG_MAX_UNCLAIMED_PER_HOST=str(count + 1),
    )
    os.environ.pop("INSTAPG_DYNAMODB_ENDPOINT", None)
    from moto import mock_aws

    from chalicelib import context, creation, hosts, metering, models, quotas
    from chalicelib.crypto import new_key_spec
    from chalicelib.records import Requester
    from chalicelib.schemas import CreateDatabase
    from tools.dev import pgserver

    os.environ["INSTAPG_KEYRING"] = new_key_spec("bench")
    root = pgserver.private_dir("instapg-bench-")
    server = pgserver.start(root / "pg")
    try:
        os.environ["INSTAPG_BENCH_ADMIN"] = server.admin_credentials_json
        with mock_aws():
            context.reset()
            service = context.get()
            logging.getLogger("chalicelib").setLevel(logging.WARNING)  # one line per database otherwise
            models.configure(service.settings)
            models.create_tables()
            hosts.register(
                service.settings, "bench", "127.0.0.1", server.port, "env:INSTAPG_BENCH_ADMIN", count + 1, "disable"
            )
            started = time.perf_counter()
            for _ in range(count):
                creation.create(service, CreateDatabase(ref="bench"), Requester(ip="127.0.0.1"))
            print(f"created {count} databases in {time.perf_counter() - started:.1f} s")

            def timed(label: str, step=quotas.enforce) -> None:
                from chalicelib.clock import Deadline

                context.reset()
                service = context.get()
                logging.getLogger("chalicelib").setLevel(logging.WARNING)
                started = time.perf_counter()
                summary = step(service, Deadline.after(600))
                elapsed = time.perf_counter() - started
                brief = {k: (len(v) if isinstance(v, list) else v) for k, v in summary.items()}
                print(f"{label:<28} {elapsed * 1000:7.0f} ms  {json.dumps(brief)}")

            timed("first pass, sizes recorded")
            timed("pass, nothing changed")
            os.environ["INSTAPG_UNCLAIMED_STORAGE_MB"] = "1"
            timed("pass, locking all")
            os.environ["INSTAPG_UNCLAIMED_STORAGE_MB"] = "100"
            timed("pass, unlocking all")
            timed("metering, first of the day", metering.run)
            timed("metering, nothing changed", metering.run)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
