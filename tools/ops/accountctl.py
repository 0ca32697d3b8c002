"""Operator CLI for accounts (the only way to make one when INSTAPG_OPEN_SIGNUP=false).

    python -m tools.ops.accountctl create --email dev@example.com   # prints the API key, once
    python -m tools.ops.accountctl new-key ACCOUNT_ID                # another key for the account
    python -m tools.ops.accountctl revoke ACCOUNT_ID                 # every key of the account stops working
    python -m tools.ops.accountctl revoke-key                        # one key, read from stdin (keeps it out of shell history)
    python -m tools.ops.accountctl show ACCOUNT_ID

It reads the same environment as the service (INSTAPG_TABLE_PREFIX,
INSTAPG_DYNAMODB_ENDPOINT, AWS_REGION and the usual AWS credentials).
"""

from __future__ import annotations

import argparse
import json
import sys


def _configure() -> None:
    from chalicelib import models
    from chalicelib.settings import load

    models.configure(load())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ops.accountctl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create an account and print its API key")
    create.add_argument("--email", required=True)
    for name, text in [("new-key", "add an API key"), ("revoke", "revoke the account"), ("show", "show it")]:
        sub.add_parser(name, help=text).add_argument("account_id")
    sub.add_parser("revoke-key", help="revoke the API key read from stdin")
    args = parser.parse_args(argv)

    from chalicelib import accounts
    from chalicelib.errors import DomainError

    _configure()
    if args.command == "create":
        try:
            new = accounts.create(accounts.parse_email(args.email))
        except DomainError as exc:
            print(f"error: {exc.error}. {exc.hint}", file=sys.stderr)
            return 2
        print(json.dumps({"account_id": new.account.id, "email": new.account.email, "api_key": new.api_key}))
        print("The API key is shown only this once.", file=sys.stderr)
        return 0
    if args.command == "revoke-key":
        key = sys.stdin.readline().strip()
        found = accounts.revoke_key(key)
        print("revoked" if found else "unknown key", file=sys.stderr)
        return 0 if found else 1
    account = accounts.find(args.account_id)
    if account is None:
        print(f"error: no account {args.account_id}", file=sys.stderr)
        return 1
    if args.command == "new-key":
        print(json.dumps({"account_id": account.id, "api_key": accounts.add_key(account.id)}))
    elif args.command == "revoke":
        accounts.revoke(account.id)
        print(f"revoked account {account.id}", file=sys.stderr)
    else:
        print(json.dumps({"account_id": account.id, "email": account.email, "status": account.status}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
