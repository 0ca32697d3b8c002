"""Operator command: the Postgres hosts that carry tenant databases.

    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl add --id rds-1 --hostname db.xxxx.us-east-2.rds.amazonaws.com \\
        --credentials secretsmanager:arn:aws:secretsmanager:us-east-2:123456789012:secret:rds!db-... --capacity 500
    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl pooler --id rds-1 --hostname <NLB name> \\
        --admin <PoolerAdminEndpoint>:6433 --credentials secretsmanager:<PoolerAdminSecretArn> \\
        --sync-credentials secretsmanager:<PoolerSyncSecretArn>   # its PgBouncer (stack outputs)
    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl list
    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl drain --id rds-1   # no new databases there
    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl activate --id rds-1   # new databases again
    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl remove --id rds-1   # a drained, empty host
    INSTAPG_TABLE_PREFIX=instapg-prod python -m tools.ops.hostctl orphans   # claimed databases no record knows

`add` connects to the host as its admin first (checks CREATEROLE/CREATEDB,
revokes PUBLIC's CONNECT on postgres/template1), so run it from somewhere that
reaches the host (inside the VPC); `--no-check` only writes the record.
Running `add` again for the same id updates the host and keeps its count.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime


def _settings():
    from chalicelib import models
    from chalicelib.settings import load

    settings = load()
    models.configure(settings)
    return settings


def add(args) -> int:
    from chalicelib import hosts, postgres
    from chalicelib.models import HOST_ACTIVE, HostRecord

    settings = _settings()
    if args.logical_replication and not args.replication_endpoint:
        print(
            "--logical-replication needs --replication-endpoint HOST:PORT: tenants stream through the replication "
            "gateway (tools/replication/gateway.py), which refuses physical commands (docs/replication.md)",
            file=sys.stderr,
        )
        return 2
    fields = dict(
        hostname=args.hostname,
        port=args.port,
        credentials=args.credentials,
        capacity=args.capacity,
        sslmode=args.sslmode,
        pooler_hostname=args.pooler_hostname,
        pooler_port=args.pooler_port,
        admin_dbname=args.admin_dbname,
        logical_replication=args.logical_replication,
    )
    endpoint = args.replication_endpoint
    replication = dict(
        replication_hostname=endpoint[0] if endpoint else None,
        replication_port=endpoint[1] if endpoint else None,
        replication_sslmode=args.replication_sslmode,
    )
    if args.logical_replication:
        # pg_hba.conf cannot be edited on RDS: only a private Postgres keeps the companions behind the gateway.
        print(
            "logical replication: Postgres must be reachable only from inside the VPC (postgres_private, "
            "`hostctl pooler` without --postgres-public), or a tenant's companion role could log in around the "
            "gateway and run physical commands (docs/replication.md)"
        )
    if args.no_check:
        try:
            existing = HostRecord.get(args.id)
        except HostRecord.DoesNotExist:
            existing = None
        HostRecord(
            id=args.id,
            status=existing.status if existing else HOST_ACTIVE,
            allocated=int(existing.allocated or 0) if existing else 0,
            created_at=existing.created_at if existing else datetime.now(UTC),
            region=args.region or (existing.region if existing else None),
            **fields,
            **replication,
        ).save()
        print(f"host {args.id} saved without checking it (run `add` without --no-check from inside the VPC)")
        return 0
    try:
        _, warnings = hosts.register(
            settings,
            args.id,
            region=args.region,
            replication_endpoint=endpoint,
            replication_sslmode=args.replication_sslmode,
            **fields,
        )
    except (hosts.CredentialsError, postgres.HostUnavailable, ValueError) as exc:
        # The message names the host and the problem, never the password.
        print(f"host {args.id} not added: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"host {args.id} added: {args.hostname}:{args.port}, capacity {args.capacity}")
    return 0


def _endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("HOST:PORT")
    return host, int(port)


def pooler(args) -> int:
    """Register (or update, or with --remove forget) the host's PgBouncer: endpoints, admin secret, store.

    With the table store (production) it first sets up the host's tenant table
    and the sync loop's read-only role with the password from --sync-credentials
    (the secret the pooler task reads), then checks that the admin console
    answers. Run from inside the VPC, as `add`.
    """
    from pynamodb.exceptions import UpdateError

    from chalicelib import hosts, poolerstore, postgres
    from chalicelib.models import HostRecord
    from chalicelib.pooler import PoolerError

    settings = _settings()
    try:
        host = HostRecord.get(args.id, consistent_read=True)
    except HostRecord.DoesNotExist:
        print(f"no host {args.id}: add it first", file=sys.stderr)
        return 1
    fields = ("pooler_hostname", "pooler_port", "pooler_admin_hostname", "pooler_admin_port", "pooler_credentials")
    fields += ("pooler_store", "pooler_sslmode", "postgres_private")
    if args.remove:
        values: dict = dict.fromkeys(fields)
        values["postgres_private"] = False
    else:
        missing = [name for name in ("hostname", "admin", "credentials") if not getattr(args, name)]
        if missing:
            print(f"pooler needs --{' --'.join(missing)} (or --remove)", file=sys.stderr)
            return 2
        values = {
            "pooler_hostname": args.hostname,
            "pooler_port": args.port,
            "pooler_admin_hostname": args.admin[0],
            "pooler_admin_port": args.admin[1],
            "pooler_credentials": args.credentials,
            "pooler_store": args.store,
            "pooler_sslmode": args.sslmode,
            "postgres_private": not args.postgres_public,
        }
        for name, value in values.items():
            setattr(host, name, value)
        if not args.no_check:
            try:
                if args.store == "table":
                    if not args.sync_credentials:
                        print("the table store needs --sync-credentials (the pooler task's PGPASSWORD secret)", file=sys.stderr)
                        return 2
                    sync = hosts.AdminCredentials(settings).get(args.sync_credentials)
                    poolerstore.setup(hosts.target(host, settings), sync.password)
                bouncer = hosts.pooler(host, hosts.AdminCredentials(settings))
                assert bouncer is not None  # every field has_pooler needs is set above
                bouncer.admin("SHOW VERSION")
            except (hosts.CredentialsError, postgres.HostUnavailable, PoolerError) as exc:
                # Names the host and the problem, never a password.
                print(f"pooler of host {args.id} not registered: {exc}", file=sys.stderr)
                return 1
    actions = [
        getattr(HostRecord, name).remove() if value is None else getattr(HostRecord, name).set(value)
        for name, value in values.items()
    ]
    try:
        HostRecord(id=args.id).update(actions=actions, condition=HostRecord.id.exists())
    except UpdateError as exc:
        if exc.cause_response_code == "ConditionalCheckFailedException":
            print(f"no host {args.id}", file=sys.stderr)
            return 1
        raise
    if args.remove:
        print(f"host {args.id} has no pooler: both connection strings go to Postgres directly")
    else:
        print(
            f"host {args.id}: pooler {args.hostname}:{args.port} (sslmode={args.sslmode}), admin console "
            f"{args.admin[0]}:{args.admin[1]}, store {args.store}"
            + ("" if args.postgres_public else "; Postgres is private: the direct string is the pooler's session entry")
        )
    return 0


def list_hosts(args) -> int:
    from chalicelib.hosts import region_of
    from chalicelib.models import HostRecord

    settings = _settings()
    rows = sorted(HostRecord.scan(), key=lambda h: h.id)
    print(f"{'ID':<16} {'STATUS':<9} {'REGION':<14} {'ALLOCATED':>9} {'CAPACITY':>8}  ENDPOINT")
    for h in rows:
        pooler = f" (pooler {h.pooler_hostname}:{h.pooler_port or h.port}" if h.pooler_hostname else ""
        if h.pooler_admin_hostname:
            pooler += f", admin {h.pooler_admin_hostname}:{h.pooler_admin_port}, {h.pooler_store}"
        pooler += ")" if pooler else ""
        if h.logical_replication:
            gateway = f"{h.replication_hostname}:{h.replication_port}" if h.replication_hostname else "no gateway"
            pooler += f" (replication {gateway})"
        print(
            f"{h.id:<16} {h.status:<9} {region_of(h, settings):<14} {int(h.allocated or 0):>9} {int(h.capacity):>8}  {h.hostname}:{h.port}{pooler}"
        )
    if not rows:
        print("(no hosts: add one with `python -m tools.ops.hostctl add ...`)")
    return 0


def _set_status(host_id: str, status: str) -> bool:
    """Set a registered host's status; False when there is no such host."""
    from pynamodb.exceptions import UpdateError

    from chalicelib.models import HostRecord

    _settings()
    try:
        HostRecord(id=host_id).update(actions=[HostRecord.status.set(status)], condition=HostRecord.id.exists())
    except UpdateError as exc:
        if exc.cause_response_code == "ConditionalCheckFailedException":
            print(f"no host {host_id}", file=sys.stderr)
            return False
        raise
    return True


def drain(args) -> int:
    from chalicelib.models import HOST_DRAINING

    if not _set_status(args.id, HOST_DRAINING):
        return 1
    print(f"host {args.id} is draining: it keeps its databases and gets no new ones")
    return 0


def activate(args) -> int:
    """Undo `drain`: the host takes new databases again."""
    from chalicelib.models import HOST_ACTIVE

    if not _set_status(args.id, HOST_ACTIVE):
        return 1
    print(f"host {args.id} is active: it gets new databases")
    return 0


def remove(args) -> int:
    """Forget a drained host that carries nothing any more (its warm pool included).

    The condition makes it safe against a create racing the removal: a
    create's slot reservation needs the host ACTIVE, and the delete needs it
    DRAINING with nothing allocated.
    """
    from pynamodb.exceptions import DeleteError

    from chalicelib.models import HOST_DRAINING, HostRecord

    _settings()
    try:
        HostRecord(id=args.id).delete(condition=(HostRecord.status == HOST_DRAINING) & (HostRecord.allocated == 0))
    except DeleteError as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise
        try:
            host = HostRecord.get(args.id, consistent_read=True)
        except HostRecord.DoesNotExist:
            print(f"no host {args.id}", file=sys.stderr)
            return 1
        if host.status != HOST_DRAINING:
            print(f"host {args.id} is {host.status}: drain it first", file=sys.stderr)
        else:
            print(
                f"host {args.id} still carries {int(host.allocated or 0)} database(s), pooled ones included: they "
                "go as they expire or are deleted, and the scheduled job empties a draining host's pool",
                file=sys.stderr,
            )
        return 1
    print(f"host {args.id} removed")
    return 0


def orphans(args) -> int:
    """Databases Postgres marks claimed that no record references: kept by reconciliation, for a person.

    Connects to each host (run from inside the VPC). Exit status 0 when there
    are none, 3 when some need a decision (restore their records, or drop them
    by hand after asking the owner).
    """
    from chalicelib import hosts, postgres
    from chalicelib.expiry import references_name
    from chalicelib.models import DatabaseRecord, HostRecord

    settings = _settings()
    prefix = settings.name_prefix + "_"
    found = 0
    for host in sorted(HostRecord.scan(), key=lambda h: h.id):
        if args.id and host.id != args.id:
            continue
        try:
            inventory = postgres.inventory(hosts.target(host, settings), prefix)
        except (hosts.CredentialsError, postgres.HostUnavailable) as exc:
            print(f"host {host.id}: not reachable: {exc}", file=sys.stderr)
            continue
        referenced = {r.role_name for r in DatabaseRecord.by_host.query(host.id) if references_name(r)}
        for name in sorted(inventory.claimed - referenced):
            found += 1
            print(f"{host.id}\t{name}\tclaimed, no record (kept; see docs/expiry.md)")
    if not found:
        print("no claimed orphans")
    return 3 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Manage instapg's Postgres hosts.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", help="register a host, or update one")
    p_add.add_argument("--id", required=True)
    p_add.add_argument("--hostname", required=True)
    p_add.add_argument("--port", type=int, default=5432)
    p_add.add_argument("--credentials", required=True, help="secretsmanager:ARN (RDS master secret) or env:VAR")
    p_add.add_argument("--capacity", type=int, required=True, help="most databases on this host")
    p_add.add_argument("--sslmode", default="require")
    p_add.add_argument("--pooler-hostname", help="the host's PgBouncer endpoint, for the pooled connection string (RDS Proxy does not fit: see README)")
    p_add.add_argument("--pooler-port", type=int)
    p_add.add_argument("--admin-dbname", default="postgres")
    p_add.add_argument("--logical-replication", action="store_true", help="the host has rds.logical_replication=1")
    p_add.add_argument(
        "--replication-endpoint", type=_endpoint, help="HOST:PORT of the host's replication gateway as clients reach it"
    )
    p_add.add_argument("--replication-sslmode", help="sslmode of the replication string (default: --sslmode)")
    p_add.add_argument(
        "--region", help="where the host runs (creates may ask for it); default INSTAPG_DEFAULT_REGION or the AWS region"
    )
    p_add.add_argument("--no-check", action="store_true", help="write the record without connecting to the host")
    p_pooler = sub.add_parser("pooler", help="register or update a host's PgBouncer (production: the NLB and its admin port)")
    p_pooler.add_argument("--id", required=True)
    p_pooler.add_argument("--hostname", help="what clients connect to (the NLB's name, or yours pointing at it)")
    p_pooler.add_argument("--port", type=int, default=5432)
    p_pooler.add_argument("--admin", type=_endpoint, help="HOST:PORT of the admin console as the functions reach it")
    p_pooler.add_argument("--credentials", help="the admin console user's secret: secretsmanager:ARN or env:VAR")
    p_pooler.add_argument("--sync-credentials", help="table store: the sync role's secret (sets up the host's table)")
    p_pooler.add_argument("--store", default="table", help="table (production), or file:<folder> (PgBouncer beside the service)")
    p_pooler.add_argument("--sslmode", default="require", help="sslmode of the strings (require: the pooler has TLS)")
    p_pooler.add_argument("--postgres-public", action="store_true", help="clients may reach Postgres itself: the direct string goes there")
    p_pooler.add_argument("--no-check", action="store_true", help="write the record without touching the host or the pooler")
    p_pooler.add_argument("--remove", action="store_true", help="forget the host's pooler")
    sub.add_parser("list", help="list the hosts")
    p_drain = sub.add_parser("drain", help="stop placing new databases on a host")
    p_drain.add_argument("--id", required=True)
    p_activate = sub.add_parser("activate", help="place new databases on a drained host again")
    p_activate.add_argument("--id", required=True)
    p_remove = sub.add_parser("remove", help="forget a drained host with no database left")
    p_remove.add_argument("--id", required=True)
    p_orphans = sub.add_parser("orphans", help="list claimed databases that no record references")
    p_orphans.add_argument("--id", help="only this host")
    args = parser.parse_args(argv)
    commands = {
        "add": add,
        "pooler": pooler,
        "list": list_hosts,
        "drain": drain,
        "activate": activate,
        "remove": remove,
        "orphans": orphans,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
