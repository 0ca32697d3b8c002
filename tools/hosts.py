"""Operator command for the Postgres hosts that carry tenant databases.

    python -m tools.hosts add ID --hostname H [--port 5432] --credentials env:VAR|secretsmanager:ARN --capacity N
    python -m tools.hosts list
    python -m tools.hosts drain ID      # no new databases; existing ones keep working and expiring
    python -m tools.hosts activate ID   # take new databases again
    python -m tools.hosts remove ID     # only a DRAINING host with no database left (pool included)

It talks to the DynamoDB tables the environment names (INSTAPG_TABLE_PREFIX,
AWS_REGION, INSTAPG_DYNAMODB_ENDPOINT), like the service. One function per
subcommand, so new subcommands merge without touching the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from chalicelib.settings import Settings, load


class CommandError(Exception):
    """A refusal the operator can act on (printed, exit status 1)."""


def cmd_add(args: argparse.Namespace, settings: Settings) -> dict:
    """Register (or update) a host after checking its admin can create tenants."""
    from chalicelib import hosts

    record, warnings = hosts.register(
        settings,
        args.id,
        args.hostname,
        args.port,
        args.credentials,
        capacity=args.capacity,
        sslmode=args.sslmode,
        pooler_hostname=args.pooler_hostname,
        pooler_port=args.pooler_port,
        logical_replication=args.logical_replication,
    )
    return {"host": _describe(record), "warnings": warnings}


def cmd_list(args: argparse.Namespace, settings: Settings) -> dict:  # noqa: ARG001 - same signature for all
    from chalicelib.models import HostRecord

    return {"hosts": [_describe(h) for h in sorted(HostRecord.scan(), key=lambda h: h.id)]}


def cmd_drain(args: argparse.Namespace, settings: Settings) -> dict:  # noqa: ARG001
    from chalicelib.models import HOST_DRAINING

    return {"host": _describe(_set_status(args.id, HOST_DRAINING))}


def cmd_activate(args: argparse.Namespace, settings: Settings) -> dict:  # noqa: ARG001
    from chalicelib.models import HOST_ACTIVE

    return {"host": _describe(_set_status(args.id, HOST_ACTIVE))}


def cmd_remove(args: argparse.Namespace, settings: Settings) -> dict:  # noqa: ARG001
    """Forget a drained, empty host. The condition makes it safe against a racing create."""
    from pynamodb.exceptions import DeleteError

    from chalicelib.models import HOST_DRAINING, HostRecord

    host = _get(args.id)
    try:
        host.delete(condition=(HostRecord.status == HOST_DRAINING) & (HostRecord.allocated == 0))
    except DeleteError as exc:
        if exc.cause_response_code != "ConditionalCheckFailedException":
            raise
        host = _get(args.id)
        if host.status != HOST_DRAINING:
            raise CommandError(f"host {args.id} is {host.status}: drain it first") from None
        raise CommandError(
            f"host {args.id} still carries {int(host.allocated)} database(s) (pooled ones included); "
            "they go when they expire or are deleted, and the scheduled job empties a draining host's pool"
        ) from None
    return {"removed": args.id}


def _get(host_id: str):
    from chalicelib.models import HostRecord

    try:
        return HostRecord.get(host_id, consistent_read=True)
    except HostRecord.DoesNotExist:
        raise CommandError(f"no host {host_id!r}") from None


def _set_status(host_id: str, status: str):
    from chalicelib.models import HostRecord

    host = _get(host_id)
    host.update(actions=[HostRecord.status.set(status)], condition=HostRecord.id.exists())
    return host


def _describe(host) -> dict:
    return {
        "id": host.id,
        "status": host.status,
        "endpoint": f"{host.hostname}:{int(host.port)}",
        "pooler": f"{host.pooler_hostname}:{int(host.pooler_port or host.port)}" if host.pooler_hostname else None,
        "sslmode": host.sslmode,
        "credentials": host.credentials,  # where they live, never the secret
        "capacity": int(host.capacity),
        "allocated": int(host.allocated or 0),
        "logical_replication": bool(host.logical_replication),
    }


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], dict]] = {
    "add": cmd_add,
    "list": cmd_list,
    "drain": cmd_drain,
    "activate": cmd_activate,
    "remove": cmd_remove,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m tools.hosts", description="Manage instapg's Postgres hosts.")
    sub = top.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="register or update a host (checks its admin first)")
    add.add_argument("id")
    add.add_argument("--hostname", required=True)
    add.add_argument("--port", type=int, default=5432)
    add.add_argument("--credentials", required=True, help="env:VAR or secretsmanager:ARN (JSON username/password)")
    add.add_argument("--capacity", type=int, required=True, help="most databases the host carries, pool included")
    add.add_argument("--sslmode", default="require")
    add.add_argument("--pooler-hostname")
    add.add_argument("--pooler-port", type=int)
    add.add_argument("--logical-replication", action="store_true")
    sub.add_parser("list", help="every host, with capacity and allocation")
    for name, text in (
        ("drain", "no new databases on the host"),
        ("activate", "new databases on the host again"),
        ("remove", "forget a drained, empty host"),
    ):
        sub.add_parser(name, help=text).add_argument("id")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from chalicelib import models

    settings = load()
    models.configure(settings)
    from chalicelib.hosts import CredentialsError
    from chalicelib.postgres import HostUnavailable

    try:
        result = COMMANDS[args.command](args, settings)
    # ValueError: check_admin's refusal of an admin that cannot create tenants.
    except (CommandError, HostUnavailable, CredentialsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
