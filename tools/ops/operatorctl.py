"""Operator CLI for the dashboard's operator keys (not account keys: those are accountctl's).

    python -m tools.ops.operatorctl create --name alice   # prints the key, once
    python -m tools.ops.operatorctl list                  # id, name, created, revoked
    python -m tools.ops.operatorctl revoke KEY_ID         # the key and its browser sessions stop at once

It reads the same environment as the service (INSTAPG_TABLE_PREFIX,
INSTAPG_DYNAMODB_ENDPOINT, AWS_REGION and the usual AWS credentials).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ops.operatorctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("create", help="create an operator key and print it").add_argument("--name", required=True)
    sub.add_parser("list", help="list operator keys (never the keys themselves)")
    sub.add_parser("revoke", help="revoke an operator key by its id").add_argument("key_id")
    args = parser.parse_args(argv)

    from chalicelib import models, operators
    from chalicelib.clock import iso
    from chalicelib.errors import DomainError
    from chalicelib.settings import load

    models.configure(load())
    if args.command == "create":
        try:
            new = operators.create(args.name)
        except DomainError as exc:
            print(f"error: {exc.error}. {exc.hint}", file=sys.stderr)
            return 2
        print(json.dumps({"key_id": new.record.key_id, "name": new.record.name, "operator_key": new.key}))
        print("The operator key is shown only this once. Log in at <public URL>/admin.", file=sys.stderr)
        return 0
    if args.command == "list":
        for record in operators.all_keys():
            row = {"key_id": record.key_id, "name": record.name, "created_at": iso(record.created_at)}
            print(json.dumps({**row, "revoked_at": iso(record.revoked_at)}))
        return 0
    found = operators.revoke(args.key_id)
    print(f"revoked {args.key_id}" if found else f"error: no operator key {args.key_id}", file=sys.stderr)
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
